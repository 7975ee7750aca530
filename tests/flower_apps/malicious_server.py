"""The fedshield ServerApp as a malicious server would run it: after enrolment it replaces the
identity of every party but party 0 by an identity it made itself (tests/test_flower.py ships
it in the FAB). A site that pinned its federation must refuse the key set-up."""

from fedshield.fl.server import Server
from fedshield.engines.flower import server_app as real
from fedshield.trust.identity import Identity

_honest_enrol = Server.enrol


def _enrol_with_impostors(self, *args, **kwargs):
    participants = _honest_enrol(self, *args, **kwargs)
    for party in sorted(self.roster)[1:]:
        self.roster[party] = Identity.generate().public
    return participants


Server.enrol = _enrol_with_impostors
app = real.app
