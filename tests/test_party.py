"""fs.Party in anyone's training loop: plain torch loops, two rounds, shared and threshold
keys, the three algorithms, wrapped models, and a site of two ranks (gloo) that encrypts its
update in slices and broadcasts the decrypted global adapter."""

from __future__ import annotations

import socket
from contextlib import contextmanager

import pytest
import torch

import fedshield as fs
from fedshield.training.lora import get_lora_state
from rank_site import multi_rank_site, tiny_peft, train_steps, wait_for

WEIGHTS = (8.0, 24.0)
BOUND = 32.0   # the federation's public weight bound (>= every weight)


def weighted(states: list[dict], weights) -> dict:
    total = float(sum(weights))
    return {k: sum(w * s[k].double() for s, w in zip(states, weights)) / total
            for k in states[0]}


def assert_lora_equal(state: dict, ref: dict, atol: float = 1e-5) -> None:
    assert set(state) == set(ref)
    for k in ref:
        err = float((state[k].double() - ref[k].double()).abs().max())
        assert err <= atol, f"{k}: max error {err:.3g}"


def base_weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def run_rounds(parties, models, server_ctx, *, rounds=2, shares_from=None, weights=WEIGHTS,
               check=True):
    """Each round: every site trains with its own loop, encrypts, the server aggregates, every
    site applies (``check``: and then holds the weighted average of that round's local
    weights); returns each round's local LoRA states."""
    history = []
    for r in range(1, rounds + 1):
        locals_, updates = [], []
        for i, (party, model) in enumerate(zip(parties, models)):
            train_steps(model, seed=100 * r + i)
            locals_.append(get_lora_state(model))
            updates.append(party.encrypt_update(weight=weights[i]))
        agg = fs.aggregate(server_ctx, [u.to_bytes() for u in updates], round=r)
        for party in parties:
            if shares_from is None:
                party.apply_aggregate(agg.to_bytes())
            else:
                present = list(range(len(shares_from)))
                shares = [p.partial_decrypt(agg, present=present) for p in shares_from]
                party.apply_aggregate(agg, shares=shares)
            assert party.version == r
        if check:
            ref = weighted(locals_, weights)
            for model in models:
                assert_lora_equal(get_lora_state(model), ref)
        history.append(locals_)
    return history


def test_two_plain_loops_end_at_the_weighted_average(shared_keys):
    """Two PEFT models trained by plain torch loops, two rounds: after each round both hold
    the weighted average of the local LoRA weights (run_rounds checks); base weights are never
    touched."""
    ctx = shared_keys.client_context()
    models = [tiny_peft(), tiny_peft()]
    base = [base_weights(m) for m in models]
    parties = [fs.Party(ctx, m, weight_bound=BOUND) for m in models]
    history = run_rounds(parties, models, shared_keys.server_context())
    ref = weighted(history[-1], WEIGHTS)
    for party in parties:
        assert_lora_equal(party.global_state, ref)
    for b, model in zip(base, models):
        now = base_weights(model)
        assert all(torch.equal(now[n], b[n]) for n in b)


def test_threshold_keys(threshold_keys):
    """The same with threshold keys: each party's partial decryption, fused by every party."""
    ctxs, server_ctx = threshold_keys
    models = [tiny_peft(), tiny_peft()]
    parties = [fs.Party(c, m, weight_bound=BOUND) for c, m in zip(ctxs, models)]
    run_rounds(parties, models, server_ctx, shares_from=parties)
    with pytest.raises(fs.KeyMaterialError):
        parties[0].decrypt(fs.aggregate(server_ctx, [parties[0].encrypt_update(weight=1.0)]))


@pytest.fixture(scope="module")
def threshold_keys():
    return fs.keygen_threshold(n_parties=2)


def test_paper_and_ffa(shared_keys):
    """paper: the unweighted mean of the local weights replaces the global state; ffa: A stays
    at its seeded initialisation, B becomes the weighted average."""
    ctx, server = shared_keys.client_context(), shared_keys.server_context()
    models = [tiny_peft(), tiny_peft()]
    parties = [fs.Party(ctx, m, algorithm="paper", weight_bound=BOUND) for m in models]
    run_rounds(parties, models, server, rounds=1, weights=(1.0, 1.0))

    models = [tiny_peft(), tiny_peft()]
    initial = get_lora_state(models[0])
    parties = [fs.Party(ctx, m, algorithm="ffa", weight_bound=BOUND) for m in models]
    history = run_rounds(parties, models, server, rounds=2, check=False)
    ref = weighted(history[-1], WEIGHTS)
    for model in models:
        state = get_lora_state(model)
        for k in state:
            want = initial[k] if "lora_A" in k else ref[k]
            assert float((state[k].double() - want.double()).abs().max()) <= 1e-5, k


def test_pruned_update_and_the_rounds_mask(shared_keys):
    """A common mask shrinks the update; apply_aggregate finds the mask the party sent with."""
    ctx, server = shared_keys.client_context(), shared_keys.server_context()
    models = [tiny_peft(), tiny_peft()]
    parties = [fs.Party(ctx, m, weight_bound=BOUND) for m in models]
    for i, m in enumerate(models):
        train_steps(m, seed=i)
    mask = parties[0].global_mask(0.5)
    mask = {k: torch.ones_like(v) if "lora_B" in k else v for k, v in mask.items()}
    locals_ = [p.update_values() for p in parties]
    dense = parties[0].encrypt_update(weight=1.0)
    ups = [p.encrypt_update(weight=w, mask=mask) for p, w in zip(parties, WEIGHTS)]
    assert ups[0].n_values < dense.n_values
    avg = parties[0].apply_aggregate(fs.aggregate(server, ups))
    ref = weighted(locals_, WEIGHTS)
    for k in avg:
        want = torch.where(mask[k], ref[k], torch.zeros_like(ref[k]))
        assert float((avg[k].double() - want).abs().max()) <= 1e-5


def flat(state: dict) -> torch.Tensor:
    return torch.cat([state[k].double().reshape(-1) for k in sorted(state)])


def test_a_plain_party_clips_and_noises_its_updates_dp(shared_keys):
    """DP-LoRA is the party's: a plain fs.Party with dp_clip and dp_noise sends its update
    clipped to dp_clip (the global state moves by at most that, plus the noise) with discrete
    Gaussian noise of standard deviation dp_noise * dp_clip; without DP it sends it as is."""
    clip = 1e-3
    model = tiny_peft()
    party = fs.Party(None, model, dp_clip=clip, dp_noise=2.0 ** -30)
    train_steps(model, seed=5)
    raw = party.update_values()
    norm = float(flat(raw).norm())
    assert norm > 10 * clip                     # the training moved it well past the clip
    prepared = party.prepare()
    assert prepared.update_norm == pytest.approx(norm, rel=1e-6)
    assert float(flat(prepared.values).norm()) == pytest.approx(clip, rel=1e-4)
    scaled = {k: v * (clip / norm) for k, v in raw.items()}   # same direction, shorter
    assert float((flat(prepared.values) - flat(scaled)).abs().max()) <= 1e-6
    # the noise: std dp_noise * dp_clip on every coordinate, drawn afresh each time
    noisy = fs.Party(None, model, dp_clip=clip, dp_noise=1.0)   # its update: zero
    a, b = noisy.prepare().values, noisy.prepare().values
    diff = flat(a) - flat(b)                    # two draws: std sqrt(2) * sigma * clip
    assert diff.numel() > 1000
    assert float(diff.std()) == pytest.approx(2 ** 0.5 * clip, rel=0.1)
    # through encrypt_update and the aggregate: the global state moves by the clipped update
    model = tiny_peft()
    party = fs.Party(shared_keys.client_context(), model, weight_bound=BOUND, dp_clip=clip,
                     dp_noise=2.0 ** -30)
    before = flat(party.global_state)
    train_steps(model, seed=5)
    upd = party.encrypt_update(weight=8)
    party.apply_aggregate(fs.aggregate(shared_keys.server_context(), [upd]))
    assert float((flat(party.global_state) - before).norm()) == pytest.approx(clip, rel=1e-3)
    plain = fs.Party(None, tiny_peft())
    assert plain.prepare().update_norm is None and not plain.dp


@pytest.mark.parametrize("kwargs, match", [
    (dict(dp_clip=1.0), "needs both"),
    (dict(dp_noise=1.0), "needs both"),
    (dict(dp_clip=-1.0, dp_noise=1.0), "dp_clip=-1.0"),
    (dict(dp_clip=1.0, dp_noise=float("nan")), "dp_noise=nan"),
    (dict(dp_clip=1.0, dp_noise=1.0, algorithm="paper"), "algorithm='paper' sends weights"),
])
def test_a_party_refuses_dp_settings_that_cannot_hold(kwargs, match):
    with pytest.raises(fs.ParameterError, match=match):
        fs.Party(None, tiny_peft(), **kwargs)


def test_a_plain_party_of_the_paper_algorithm_weighs_one(shared_keys):
    """paper's weight rule is the party's: whatever example counts the loop reports, every
    party weighs 1 and the global state becomes the plain mean of the local weights."""
    ctx, server = shared_keys.client_context(), shared_keys.server_context()
    models = [tiny_peft(), tiny_peft()]
    parties = [fs.Party(ctx, m, algorithm="paper", weight_bound=BOUND) for m in models]
    assert [p.weight_for(n) for p, n in zip(parties, WEIGHTS)] == [1.0, 1.0]
    assert fs.Party(ctx, tiny_peft()).weight_for(24) == 24.0
    with pytest.raises(fs.ParameterError, match="weight=0"):
        parties[0].weight_for(0)
    [locals_] = run_rounds(parties, models, server, rounds=1, weights=WEIGHTS, check=False)
    for party in parties:          # the unweighted mean, not the (8, 24)-weighted one
        assert_lora_equal(party.global_state, weighted(locals_, (1.0, 1.0)))


def test_the_rounds_mask_has_one_owner_the_party(shared_keys):
    """round_mask makes the round's common mask once, from the global state the round starts
    from; the update is packed with it and the aggregate unpacked with it (nothing passed in),
    and it is gone once the round's aggregate is applied."""
    ctx, server = shared_keys.client_context(), shared_keys.server_context()
    models = [tiny_peft(), tiny_peft()]
    parties = [fs.Party(ctx, m, weight_bound=BOUND) for m in models]
    run_rounds(parties, models, server, rounds=1)          # magnitudes to rank
    masks = [p.round_mask(2, 0.5) for p in parties]
    for i, m in enumerate(models):
        train_steps(m, seed=10 + i)
    assert all(p.round_mask(2, 0.5) is mask for p, mask in zip(parties, masks))  # kept
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])       # alike
    locals_ = [p.update_values() for p in parties]
    ups = [p.encrypt(p.prepare(mask=p.round_mask(2)), w, round=2)
           for p, w in zip(parties, WEIGHTS)]
    agg = fs.aggregate(server, ups, round=2)
    avg = parties[1].apply_aggregate(agg)
    ref = weighted(locals_, WEIGHTS)
    for k in avg:
        want = torch.where(masks[0][k], ref[k], torch.zeros_like(ref[k]))
        assert float((avg[k].double() - want).abs().max()) <= 1e-5
    assert parties[1].round_mask(2) is None          # forgotten with its round


def test_wrapped_models_are_read_and_written_through_the_wrapper(shared_keys):
    """A DDP-wrapped model (one gloo rank) and a torch.compile'd one: the party reads and
    writes the LoRA weights of the peft model inside, under peft's own names."""
    from peft import get_peft_model_state_dict

    plain = tiny_peft()
    names = set(get_peft_model_state_dict(plain))
    assert set(get_lora_state(plain)) == names
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(tiny_peft())
        party = fs.Party(shared_keys.client_context(), ddp, weight_bound=BOUND)
        assert not party.ranks.distributed and set(party.global_state) == names
        train_steps(ddp, seed=1)
        local = get_lora_state(ddp)
        agg = fs.aggregate(shared_keys.server_context(), [party.encrypt_update(weight=3.0)])
        party.apply_aggregate(agg)
        assert_lora_equal(get_lora_state(ddp.module), local)
    finally:
        torch.distributed.destroy_process_group()
    with pytest.raises(TypeError, match="peft model"):
        fs.Party(shared_keys.client_context(), torch.nn.Linear(2, 2))


def test_a_party_refuses_a_foreign_aggregate(shared_keys, foreign_keys):
    model = tiny_peft()
    party = fs.Party(shared_keys.client_context(), model, weight_bound=BOUND)
    other = fs.Party(foreign_keys.client_context(), tiny_peft(), weight_bound=BOUND)
    agg = fs.aggregate(foreign_keys.server_context(), [other.encrypt_update(weight=1.0)])
    before = get_lora_state(model)
    with pytest.raises(fs.IncompatibleUpdate):
        party.apply_aggregate(agg)
    assert party.version == 0
    assert_lora_equal(get_lora_state(model), before, atol=0)


@pytest.mark.slow
def test_ranks_that_disagree_are_refused(tmp_path, shared_keys):
    """Two ranks that trained apart (no DDP) would encrypt slices of two different updates:
    every rank raises, naming the rank that differs."""
    import torch.multiprocessing as mp

    shared_keys.client_context().save(tmp_path / "site.key")
    mp.start_processes(multi_rank_site, nprocs=2, join=True, start_method="spawn",
                       args=(2, str(tmp_path), _free_port(), "unsynced", 1, 1.0, BOUND))
    for k in (0, 1):
        assert "differs between ranks [1] and rank 0" in (tmp_path / f"error-rank{k}.txt"
                                                           ).read_text()


def test_a_two_rank_site_with_dp_sends_one_clipped_update(tmp_path, shared_keys):
    """DP on a site of 2 gloo ranks (DDP): the lead draws the noise and every rank encrypts
    its slice of the same clipped, noised update; the one update moves the global state by
    dp_clip, and both ranks apply the same aggregate."""
    import torch.multiprocessing as mp

    shared_keys.client_context().save(tmp_path / "site.key")
    procs = mp.start_processes(multi_rank_site, nprocs=2, join=False, start_method="spawn",
                               args=(2, str(tmp_path), _free_port(), "ddp-dp", 1, 8.0, BOUND))
    with ranks_running(procs):
        upd = fs.EncryptedUpdate.from_bytes(wait_for(tmp_path / "update-r1.bin"))
        agg = fs.aggregate(shared_keys.server_context(), [upd], round=1)
        (tmp_path / "aggregate-r1.bin").write_bytes(agg.to_bytes())
        layout = fs.Layout.from_state_dict(get_lora_state(tiny_peft()))
        avg = fs.decrypt_update(shared_keys.client_context(), agg, layout)
        assert float(flat(avg).norm()) == pytest.approx(1e-3, rel=1e-3)
        wait_for(tmp_path / "global-r1-rank1.pt")
        wait_for(tmp_path / "global-r1-rank0.pt")
        ranks = [torch.load(tmp_path / f"global-r1-rank{k}.pt") for k in (0, 1)]
        assert_lora_equal(ranks[1], ranks[0], atol=0)


@contextmanager
def ranks_running(procs):
    """The body runs beside a site's rank processes: they are stopped if it fails, else
    waited for."""
    try:
        yield
    except BaseException:
        for proc in procs.processes:
            proc.terminate()
            proc.join()
        raise
    while not procs.join(timeout=300):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("wrapper", ["ddp", pytest.param("fsdp2", marks=pytest.mark.slow)])
def test_a_two_rank_site(tmp_path, shared_keys, wrapper):
    """Site A trains on 2 gloo ranks (DDP, or FSDP2 sharding the LoRA weights) and sends one
    update per round, encrypted half by each rank; site B is a plain loop in this process.
    Two rounds: every rank of A and site B end each round at the weighted average of the two
    sites' local weights."""
    import torch.multiprocessing as mp

    shared_keys.client_context().save(tmp_path / "site.key")
    rounds = 2
    procs = mp.start_processes(multi_rank_site, nprocs=2, join=False, start_method="spawn",
                               args=(2, str(tmp_path), _free_port(), wrapper, rounds,
                                     WEIGHTS[0], BOUND))
    with ranks_running(procs):
        model = tiny_peft()
        party = fs.Party(shared_keys.client_context(), model, weight_bound=BOUND)
        server = shared_keys.server_context()
        for r in range(1, rounds + 1):
            train_steps(model, seed=7 + r)
            mine = get_lora_state(model)
            upd = party.encrypt_update(weight=WEIGHTS[1])
            theirs = fs.EncryptedUpdate.from_bytes(wait_for(tmp_path / f"update-r{r}.bin"))
            agg = fs.aggregate(server, [theirs, upd], round=r)
            (tmp_path / f"aggregate-r{r}.bin").write_bytes(agg.to_bytes())
            party.apply_aggregate(agg)
            wait_for(tmp_path / f"global-r{r}-rank1.pt")
            wait_for(tmp_path / f"global-r{r}-rank0.pt")
            local_a = [torch.load(tmp_path / f"local-r{r}-rank{k}.pt") for k in (0, 1)]
            assert_lora_equal(local_a[1], local_a[0], atol=0)   # the ranks trained as one
            ref = weighted([local_a[0], mine], WEIGHTS)
            assert_lora_equal(get_lora_state(model), ref)
            for k in (0, 1):
                assert_lora_equal(torch.load(tmp_path / f"global-r{r}-rank{k}.pt"), ref)
