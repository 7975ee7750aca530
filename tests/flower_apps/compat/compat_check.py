"""Runs tests/flower_apps/compat/toy_apps.py (fedshield's message pattern: custom-stype uint8
chunks, query/train, a large reply) on fedshield.engines.flower.deployment.Deployment under any
interpreter with any Flower release; fedshield itself need not be installed there.

    python compat_check.py PATH/TO/deployment.py NBYTES WORKDIR
"""
import importlib.util, shutil, sys, time
from pathlib import Path
here = Path(__file__).parent
spec = importlib.util.spec_from_file_location("deployment", sys.argv[1])
dep_mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(dep_mod)
work = Path(sys.argv[3]); shutil.rmtree(work, ignore_errors=True); work.mkdir(parents=True)
app = work / "app"; app.mkdir()
shutil.copy(here / "toy_apps.py", app / "toy_apps.py")
nbytes = int(sys.argv[2])
dep_mod.write_app_project(app, name="toy", description="toy", server_app="toy_apps:server",
                          client_app="toy_apps:client", config={"out": str(work), "nbytes": nbytes})
t = time.time()
with dep_mod.Deployment(work, 2, [{"party-id": 0}, {"party-id": 1}]) as d:
    d.start_superlink(); d.start_supernode(0); d.start_supernode(1)
    code = d.run_app(app, 600)
print("code", code, "seconds", round(time.time() - t, 1))
print((work / "toy-result.json").read_text() if (work / "toy-result.json").exists() else "NO RESULT")
