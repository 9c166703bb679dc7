"""Episodic memory: task embeddings, k-NN, eviction, persistence."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from agent.algorithms.base import TaskTensors
from agent.algorithms.maml import MAML
from agent.memory import MemoryBank, MemoryEntry, random_projection, task_embedding
from agent.nn.mlp import MLPFeatures
from agent.nn.model import MetaModel


def random_bank(n, dim, capacity=None, eviction="reservoir", seed=0):
    rng = np.random.default_rng(seed)
    bank = MemoryBank(capacity or n, dim, eviction, rng=np.random.default_rng(seed + 1))
    for i in range(n):
        bank.add(MemoryEntry(f"t{i}", rng.standard_normal(dim), {"w": rng.standard_normal(3).astype(np.float32)},
                             algorithm="maml", budget={"steps": 1, "members": 1}, timestamp=float(i),
                             annotations={"family": "sine"}))
    return bank


def brute_force(bank, q, k):
    e = np.array([x.embedding for x in bank], dtype=np.float64)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    s = e @ (q / np.linalg.norm(q))
    order = np.argsort(-s)[:k]
    return [list(bank)[i].task_id for i in order], s[order]


# ---------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eviction", ["reservoir", "diversity"])
def test_knn_equals_brute_force(eviction):
    bank = random_bank(400, 24, capacity=300, eviction=eviction)
    rng = np.random.default_rng(5)
    for _ in range(20):
        q = rng.standard_normal(24)
        for k in (1, 7, 300, 1000):
            got = bank.query(q, k)
            ids, sims = brute_force(bank, q, k)
            assert [e.task_id for e, _ in got] == ids
            assert np.allclose([s for _, s in got], sims, atol=1e-5)
            assert all(a >= b for (_, a), (_, b) in zip(got, got[1:]))


def test_knn_equals_brute_force_on_a_large_bank():
    """Large banks select with torch.topk instead of argpartition: same answers."""
    rng = np.random.default_rng(1)
    bank = MemoryBank(6000, 8)
    e = rng.standard_normal((6000, 8))
    for i in range(6000):
        bank.add(MemoryEntry(str(i), e[i]))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    for _ in range(10):
        q = rng.standard_normal(8)
        s = e @ (q / np.linalg.norm(q))
        for k in (1, 10, 100):
            got = bank.query(q, k)
            idx = [int(x.task_id) for x, _ in got]
            # Same neighbours up to float32 rounding: near-ties (6000 points in 8-d) may swap.
            assert np.allclose(s[idx], np.sort(s)[::-1][:k], atol=1e-5)
            assert np.allclose([v for _, v in got], s[idx], atol=1e-5) and len(set(idx)) == k
            assert idx[0] == int(np.argmax(s)) or s[idx[0]] > s.max() - 1e-5


def test_query_edge_cases():
    bank = MemoryBank(4, 3)
    assert bank.query(np.ones(3), 5) == []
    bank.add(MemoryEntry("a", np.array([1.0, 0, 0])))
    assert bank.query(np.ones(3), 0) == []
    ((e, s),) = bank.query(np.array([2.0, 0, 0]), 3)
    assert e.task_id == "a" and s == pytest.approx(1.0)
    for bad in [np.ones(4), np.zeros(3), np.array([np.nan, 1, 1])]:
        with pytest.raises(ValueError):
            bank.query(bad, 1)
        with pytest.raises(ValueError):
            bank.add(MemoryEntry("b", bad))
    with pytest.raises(ValueError):
        MemoryBank(4, 3, eviction="lru")


def test_entries_store_normalised_arrays_and_updates():
    bank = MemoryBank(3, 2)
    e = MemoryEntry("a", np.array([3.0, 4.0]), {"head": torch.ones(2, requires_grad=True), "proto": [[1, 2]]})
    assert bank.add(e) is None
    assert isinstance(e.state["head"], np.ndarray) and e.state["proto"].shape == (1, 2)
    assert np.allclose(e.embedding, [0.6, 0.8]) and e.embedding.dtype == np.float32 and e.seq == 0
    with pytest.raises(ValueError):
        e.embedding[0] = 1.0  # a read-only view of the bank's matrix
    assert bank.update_outcome("a", quality=0.9, failed=False) and bank.get("a").quality == 0.9
    assert not bank.update_outcome("zzz", quality=1.0)
    replaced = bank.add(MemoryEntry("a", np.array([0.0, 1.0])))  # same id: replaced in place
    assert replaced is e and len(bank) == 1 and bank.get("a").seq == 1
    assert np.allclose(e.embedding, [0.6, 0.8])  # the old entry keeps its own copy
    assert "a" in bank
    assert bank.get("a").state_tensors() == {}
    assert e.state_tensors(torch.float64)["head"].dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# Eviction
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eviction", ["reservoir", "diversity"])
def test_capacity_never_exceeded_and_bookkeeping_consistent(eviction):
    rng = np.random.default_rng(0)
    bank = MemoryBank(17, 8, eviction, rng=np.random.default_rng(1))
    for i in range(300):
        v = rng.standard_normal(8)
        if i % 7 == 0 and i:  # some near-duplicates and some exact re-adds of an id
            v = list(bank)[i % len(bank)].embedding + 1e-3 * rng.standard_normal(8)
        bank.add(MemoryEntry(f"t{i % 250}", v))
        assert len(bank) <= 17
        assert bank.embeddings.shape == (len(bank), 8)
        assert {e.task_id for e in bank} == set(bank._slot)
        assert all(bank._entries[s].task_id == t for t, s in bank._slot.items())
    assert len(bank) == 17
    if eviction == "diversity":  # the incrementally kept nearest neighbours match a recomputation
        e = bank.embeddings.astype(np.float64)
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        assert np.allclose(bank._nn_sim[:17], s.max(1), atol=1e-5)
        assert np.allclose(s[np.arange(17), bank._nn_idx[:17]], s.max(1), atol=1e-5)


def test_reservoir_inclusion_is_uniform():
    """Algorithm R keeps every one of n items with probability capacity / n."""
    runs, n, cap = 2000, 20, 5
    master = np.random.default_rng(12345)
    counts = np.zeros(n)
    onehots = np.eye(n)
    for _ in range(runs):
        bank = MemoryBank(cap, n, "reservoir", rng=np.random.default_rng(master.integers(2**63)))
        for i in range(n):
            bank.add(MemoryEntry(str(i), onehots[i]))
        for e in bank:
            counts[int(e.task_id)] += 1
    assert counts.sum() == runs * cap
    expected = np.full(n, runs * cap / n)
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    # A biased policy (always replace the newest slot) fails the same test: it has power.
    biased = np.zeros(n)
    biased[: cap - 1] = runs
    biased[cap - 1:] = runs / (n - cap + 1)
    assert stats.chisquare(biased, expected).pvalue < 1e-6


def test_reservoir_is_reproducible_with_a_seed():
    a = random_bank(100, 4, capacity=10, seed=3)
    b = random_bank(100, 4, capacity=10, seed=3)
    assert [e.task_id for e in a] == [e.task_id for e in b]
    assert a.seen == 100


def test_diversity_evicts_a_duplicate_before_a_distinct_entry():
    bank = MemoryBank(3, 3, "diversity")
    bank.add(MemoryEntry("x", np.array([1.0, 0, 0])))
    bank.add(MemoryEntry("y", np.array([0, 1.0, 0])))
    bank.add(MemoryEntry("y-dup", np.array([0, 1.0, 0.02])))
    evicted = bank.add(MemoryEntry("z", np.array([0, 0, 1.0])))
    assert evicted.task_id == "y" and sorted(e.task_id for e in bank) == ["x", "y-dup", "z"]
    # A new near-duplicate replaces its older twin rather than pushing out a distinct entry.
    evicted = bank.add(MemoryEntry("x-dup", np.array([1.0, 0.01, 0])))
    assert evicted.task_id == "x" and sorted(e.task_id for e in bank) == ["x-dup", "y-dup", "z"]


def test_diversity_keeps_rare_tasks_that_reservoir_loses():
    rng = np.random.default_rng(0)
    common, rare = np.array([1.0, 0, 0, 0]), np.array([0, 0, 0, 1.0])
    stream = [("rare", rare)] + [(f"c{i}", common + 0.05 * rng.standard_normal(4)) for i in range(200)]
    kept = {}
    for eviction in ("reservoir", "diversity"):
        bank = MemoryBank(10, 4, eviction, rng=np.random.default_rng(1))
        for tid, v in stream:
            bank.add(MemoryEntry(tid, v))
        kept[eviction] = "rare" in bank
    assert kept == {"reservoir": False, "diversity": True}


# ---------------------------------------------------------------------------------------------
# Persistence
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eviction", ["reservoir", "diversity"])
def test_state_dict_round_trip(eviction, tmp_path):
    bank = random_bank(60, 16, capacity=40, eviction=eviction)
    bank.update_outcome(list(bank)[0].task_id, quality=0.5, failed=True)
    state = bank.state_dict()
    json.dumps(state["meta"])
    assert all(isinstance(v, np.ndarray) for v in state["arrays"].values())
    path = tmp_path / "memory.npz"
    bank.save(path)
    for clone in (MemoryBank.from_state_dict(state), MemoryBank.load(path)):
        assert len(clone) == len(bank) and clone.seen == bank.seen and clone.nbytes == bank.nbytes
        rng = np.random.default_rng(9)
        for _ in range(10):
            q = rng.standard_normal(16)
            a, b = bank.query(q, 5), clone.query(q, 5)
            assert [e.task_id for e, _ in a] == [e.task_id for e, _ in b]
            assert [s for _, s in a] == [s for _, s in b]
        e0, c0 = list(bank)[0], list(clone)[0]
        assert (c0.quality, c0.failed, c0.annotations, c0.budget) == (0.5, True, {"family": "sine"}, e0.budget)
        assert np.array_equal(c0.state["w"], e0.state["w"]) and c0.state["w"].dtype == np.float32
    # Evictions continue identically (the rng state travels with the bank).
    clone = MemoryBank.load(path)
    rng = np.random.default_rng(10)
    for i in range(50):
        v = rng.standard_normal(16)
        x, y = bank.add(MemoryEntry(f"n{i}", v)), clone.add(MemoryEntry(f"n{i}", v))
        assert (x and x.task_id) == (y and y.task_id)
    assert [e.task_id for e in bank] == [e.task_id for e in clone]


def test_persistence_rejects_bad_input(tmp_path):
    bank = MemoryBank(2, 2)
    bank.add(MemoryEntry("a", np.ones(2), annotations={"obj": object()}))
    with pytest.raises(TypeError):
        bank.state_dict()
    with pytest.raises(TypeError):
        bank.add(MemoryEntry("b", np.ones(2), {"bad": np.array([object()])}))
    good = MemoryBank(2, 2)
    good.add(MemoryEntry("a", np.ones(2)))
    state = good.state_dict()
    state["meta"]["format"] = 99
    with pytest.raises(ValueError):
        MemoryBank.from_state_dict(state)


def test_nbytes_counts_matrix_and_states():
    bank = MemoryBank(100, 32)
    base = bank.nbytes
    assert base >= 100 * 32 * 4
    bank.add(MemoryEntry("a", np.ones(32), {"w": np.zeros(1000, np.float32)}))
    assert bank.nbytes == base + 4000


# ---------------------------------------------------------------------------------------------
# Task embeddings
# ---------------------------------------------------------------------------------------------
def _model():
    """A 1-40-40 ReLU net whose kinks are spread over [-5, 5]. (With the zero biases of a fresh
    init every feature is a mix of relu(x) and relu(-x), which describes no function; a
    meta-trained backbone has useful biases, random ones stand in for them here.)"""
    maml = MAML(MetaModel(MLPFeatures(1, (40, 40)), 40, 1))
    meta = maml.init_meta(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    w0 = meta["params.features.layers.0.weight"].detach()[:, 0].abs()
    meta["params.features.layers.0.bias"] = ((2 * torch.rand(40, generator=g) - 1) * 5 * w0).requires_grad_()
    meta["params.features.layers.1.bias"] = ((2 * torch.rand(40, generator=g) - 1) * 0.5).requires_grad_()
    return maml, meta


def _regression(fn, g, k=10):
    x = 10 * torch.rand(k, 1, generator=g) - 5
    return TaskTensors(x, fn(x), x, None, "regression")


def test_embedding_shape_norm_and_determinism():
    maml, meta = _model()
    task = _regression(torch.sin, torch.Generator().manual_seed(0))
    e = task_embedding(maml, meta, task)
    assert e.shape == (85,) and e.dtype == np.float32 and np.linalg.norm(e) == pytest.approx(1.0, abs=1e-6)
    assert np.array_equal(e, task_embedding(maml.model, meta, task))  # algorithm or model
    p = random_projection(85, 16, seed=1)
    ep = task_embedding(maml, meta, task, projection=p)
    assert ep.shape == (16,) and np.linalg.norm(ep) == pytest.approx(1.0, abs=1e-6)
    assert np.array_equal(p, random_projection(85, 16, seed=1))
    flat = TaskTensors(task.support_x, torch.zeros(10, 1), task.query_x, None, "regression")
    assert np.isfinite(task_embedding(maml, meta, flat)).all()  # constant targets: no NaN


def test_embedding_same_family_closer_than_different_family():
    maml, meta = _model()
    g = torch.Generator().manual_seed(1)
    sine_a = _regression(lambda x: 2.0 * torch.sin(x - 0.3), g)
    sine_b = _regression(lambda x: 2.5 * torch.sin(x - 0.5), g)
    quad = _regression(lambda x: 0.2 * x**2 - 1.0, g)
    line = _regression(lambda x: 0.5 * x + 1.0, g)
    ea, eb, eq, el = (task_embedding(maml, meta, t) for t in (sine_a, sine_b, quad, line))
    assert ea @ eb > max(ea @ eq, ea @ el, eb @ eq, eb @ el)
    # Classification: two tasks over the same classes are closer than a task over other classes.
    model = MetaModel(MLPFeatures(2, (32,)), 32, 3)
    params, _ = model.init_state(torch.Generator().manual_seed(0))

    def blobs(centres, seed):
        gg = torch.Generator().manual_seed(seed)
        y = torch.arange(3).repeat_interleave(5)
        return TaskTensors(centres[y] + 0.2 * torch.randn(15, 2, generator=gg), y, torch.zeros(1, 2), None)

    here = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]])
    there = torch.tensor([[5.0, 5.0], [5.0, 7.0], [7.0, 5.0]])
    c1, c2, c3 = (task_embedding(model, params, blobs(c, s)) for c, s in ((here, 0), (here, 1), (there, 2)))
    assert c1 @ c2 > c1 @ c3 and c1.shape == (69,)
    assert math.isfinite(float(c1 @ c2))


def test_embedding_ignores_family_annotation_and_works_in_bank():
    maml, meta = _model()
    g = torch.Generator().manual_seed(2)
    bank = MemoryBank(10, 85, "diversity")
    for i, fn in enumerate([torch.sin, torch.cos, lambda x: 0.3 * x]):
        t = _regression(fn, g)
        bank.add(MemoryEntry(f"t{i}", task_embedding(maml, meta, t), annotations={"family": "whatever"}))
    probe = task_embedding(maml, meta, _regression(lambda x: 1.1 * torch.sin(x), g))
    assert bank.query(probe, 1)[0][0].task_id == "t0"


def test_embedding_ranks_same_family_first_on_most_random_draws():
    maml, meta = _model()
    g = torch.Generator().manual_seed(3)

    def draw(family):
        u = torch.rand(2, generator=g)
        fn = {"sine": lambda x: (1 + 2 * u[0]) * torch.sin(x - 0.5 * u[1]),
              "line": lambda x: (2 * u[0] - 1) * x + u[1],
              "quad": lambda x: (0.1 + 0.2 * u[0]) * x**2 - 1}[family]
        return task_embedding(maml, meta, _regression(fn, g))

    n, wins = 60, 0
    for i in range(n):
        a, b, other = draw("sine"), draw("sine"), draw(("line", "quad")[i % 2])
        wins += a @ b > a @ other
    assert wins >= 0.9 * n, wins


# ---------------------------------------------------------------------------------------------
# IVF index
# ---------------------------------------------------------------------------------------------
def clustered(n, dim, rng, centres=None, noise=0.3):
    centres = rng.standard_normal((40, dim)) if centres is None else centres
    x = centres[rng.integers(0, len(centres), n)]
    return x + noise * np.linalg.norm(x, axis=1, keepdims=True) * rng.standard_normal((n, dim)) / math.sqrt(dim), centres


def ivf_bank(n, dim, capacity=None, eviction="reservoir", seed=0, index_min=300, nprobe=4, nlist=0):
    rng = np.random.default_rng(seed)
    data, centres = clustered(n, dim, rng)
    bank = MemoryBank(capacity or n, dim, eviction, rng=np.random.default_rng(seed + 1), index="ivf",
                      index_min=index_min, nprobe=nprobe, nlist=nlist, index_seed=seed)
    for i in range(n):
        bank.add(MemoryEntry(f"t{i}", data[i], {"w": np.full(2, i, np.float32)}))
    return bank, centres


def check_index_consistent(bank):
    """Every stored slot is in exactly one list, the list of its vector's nearest centroid
    (as of its last add or the last training), and nothing else is indexed."""
    ix = bank.index
    n = len(bank)
    members = np.concatenate([ix._members[c][: ix._count[c]] for c in range(ix.nlist)])
    assert sorted(members.tolist()) == list(range(n))
    nearest = (bank.embeddings @ ix.centroids.T).argmax(1)
    for s in range(n):
        c = ix.list_of(s)
        assert ix._members[c][ix._pos[s]] == s
        # ties in the centroid scores aside, the list is the nearest centroid's
        sims = ix.centroids @ bank.embeddings[s]
        assert c == nearest[s] or math.isclose(sims[c], sims[nearest[s]], rel_tol=0, abs_tol=1e-6)


def test_ivf_recall_is_high_on_clustered_data_and_exact_with_every_list():
    bank, centres = ivf_bank(3000, 16, nprobe=4)
    assert bank.uses_index and bank.index.nlist > 1
    rng = np.random.default_rng(7)
    queries, _ = clustered(200, 16, rng, centres)
    hits = []
    for q in queries:
        exact = bank.query_indices(q, 4, exact=True)[0]
        approx, sims = bank.query_indices(q, 4)
        hits.append(len(set(exact) & set(approx)) / 4)
        # the similarities returned are exact (re-ranked from the stored vectors)
        assert np.allclose(sims, bank.embeddings[approx] @ (q / np.linalg.norm(q)), atol=1e-5)
    assert np.mean(hits) >= 0.95
    # Probing every list is exact k-NN: the same slots, in the same order, as the brute force.
    bank.index.nprobe = bank.index.nlist
    for q in queries[:50]:
        a, sa = bank.query_indices(q, 6)
        e, se = bank.query_indices(q, 6, exact=True)
        assert a.tolist() == e.tolist() and np.allclose(sa, se, atol=1e-6)


def test_small_banks_are_searched_exactly():
    bank, _ = ivf_bank(200, 8, index_min=300)
    assert not bank.index.trained and not bank.uses_index
    q = np.ones(8)
    assert bank.query_indices(q, 5)[0].tolist() == bank.query_indices(q, 5, exact=True)[0].tolist()


@pytest.mark.parametrize("eviction", ["reservoir", "diversity"])
def test_ivf_stays_consistent_through_evictions_replacements_and_retraining(eviction):
    bank, centres = ivf_bank(2500, 12, capacity=800, eviction=eviction, index_min=300)
    check_index_consistent(bank)
    trainings = bank.index.trainings
    assert trainings >= 2  # trained at 300, retrained as entries changed
    rng = np.random.default_rng(3)
    # Replacing an id in place moves its slot to the list of its new vector.
    victim = list(bank)[5].task_id
    bank.add(MemoryEntry(victim, -centres[0]))
    check_index_consistent(bank)
    # No query can return an evicted entry, and each result is what the stored vectors say.
    stored = {e.task_id for e in bank}
    for q in clustered(50, 12, rng, centres)[0]:
        for e, s in bank.query(q, 4):
            assert e.task_id in stored
            assert math.isclose(s, float(e.embedding @ (q / np.linalg.norm(q))), abs_tol=1e-5)


def test_ties_are_broken_by_slot_in_both_paths():
    bank = MemoryBank(2000, 4, index="ivf", index_min=100, nprobe=50)
    rng = np.random.default_rng(0)
    for i in range(2000):
        v = np.array([1.0, 0, 0, 0]) if i % 500 == 7 else rng.standard_normal(4)
        bank.add(MemoryEntry(f"t{i}", v))
    for exact in (True, False):
        slots, sims = bank.query_indices(np.array([1.0, 0, 0, 0]), 3, exact=exact)
        assert slots.tolist() == [7, 507, 1007] and np.allclose(sims, 1.0)


def test_ivf_training_is_deterministic():
    a, _ = ivf_bank(1500, 8, seed=4)
    b, _ = ivf_bank(1500, 8, seed=4)
    assert np.array_equal(a.index.centroids, b.index.centroids)
    assert np.array_equal(a.index._list_of[:1500], b.index._list_of[:1500])


@pytest.mark.parametrize("eviction", ["reservoir", "diversity"])
def test_ivf_state_round_trip_gives_identical_results(eviction, tmp_path):
    bank, centres = ivf_bank(2000, 10, capacity=900, eviction=eviction, index_min=300, nprobe=3)
    path = tmp_path / "memory.npz"
    bank.save(path)
    clone = MemoryBank.load(path)
    assert clone.uses_index and np.array_equal(clone.index.centroids, bank.index.centroids)
    rng = np.random.default_rng(11)
    queries = clustered(100, 10, rng, centres)[0]

    def same():
        for q in queries:
            a, sa = bank.query_indices(q, 5)
            b, sb = clone.query_indices(q, 5)
            assert a.tolist() == b.tolist() and sa.tolist() == sb.tolist()

    same()
    # Adds, evictions and retrainings continue identically after the round trip.
    more = clustered(1500, 10, rng, centres)[0]
    for i, v in enumerate(more):
        x, y = bank.add(MemoryEntry(f"n{i}", v)), clone.add(MemoryEntry(f"n{i}", v))
        assert (x and x.task_id) == (y and y.task_id)
    assert clone.index.trainings == bank.index.trainings > 1
    same()
    check_index_consistent(clone)


def test_format_1_files_load_and_the_index_is_rebuilt():
    bank, _ = ivf_bank(600, 6, index_min=300)
    state = bank.state_dict()
    old = {"meta": {k: v for k, v in state["meta"].items() if k != "index"},
           "arrays": {k: v for k, v in state["arrays"].items() if not k.startswith("ivf_")}}
    old["meta"]["format"] = 1
    clone = MemoryBank.from_state_dict(old)
    assert clone.index_kind == "exact" and not clone.uses_index
    clone.configure_index("ivf", index_min=300, nprobe=4, index_seed=0)
    assert clone.uses_index
    check_index_consistent(clone)
    clone.configure_index("exact")
    assert clone.index is None and not clone.uses_index
    with pytest.raises(ValueError, match="index"):
        MemoryBank(4, 2, index="hnsw")


def test_corrupt_ivf_arrays_are_rejected():
    bank, _ = ivf_bank(600, 6, index_min=300)
    state = bank.state_dict()
    state["arrays"]["ivf_lists"] = state["arrays"]["ivf_lists"].copy()
    state["arrays"]["ivf_lists"][0] = 10_000
    with pytest.raises(ValueError, match="IVF"):
        MemoryBank.from_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Warm starts in the agent (memory.warm_start: select)
# ---------------------------------------------------------------------------------------------
def _agent(memory: dict, levels=((3, 1),)):
    from agent.agent import Agent

    return Agent.from_config({"model": {"arch": "mlp", "hidden": [16, 16]},
                              "agent": {"in_shape": [1], "out_dim": 1, "seed": 3},
                              "compute": {"levels": [list(x) for x in levels]},
                              "memory": {"capacity": 100, **memory}, "online": {"enabled": False},
                              "metrics": {"addr": "0"}})


def _line_records(rng, n, slope, intercept, start=0):
    from agent.task import Task

    out = []
    for i in range(n):
        x, xq = rng.uniform(-5, 5, (10, 1)), rng.uniform(-5, 5, (10, 1))
        out.append(Task(f"s{start + i}", "regression", x, slope * x + intercept, xq, slope * xq + intercept))
    return out


def _mse(out, t):
    return float(np.mean((np.asarray(out.predictions).reshape(-1) - t.query_y.reshape(-1)) ** 2))


@pytest.mark.parametrize("levels", [((3, 1),), ((3, 2),)])
def test_warm_starts_help_on_a_recurring_task_and_change_nothing_else(levels):
    """Fresh records of one function (after three of another): memory-on answers later records
    from the earlier records' heads, so adaptation accumulates across records, and beats
    memory-off by far; wherever no warm start answered, the answer is memory-off's."""
    rng = np.random.default_rng(0)
    tasks = _line_records(rng, 3, -1.0, 2.0) + _line_records(rng, 20, 0.8, -1.0, start=3)
    on, off = _agent({}, levels), _agent({"enabled": False}, levels)
    mse_on, mse_off, warm = [], [], []
    for t in tasks:
        a, b = on.step(t), off.step(t)
        mse_on.append(_mse(a, t))
        mse_off.append(_mse(b, t))
        warm.append("warm_start" in a.flags)
        if "warm_start" not in a.flags:
            np.testing.assert_array_equal(a.predictions, b.predictions)
    assert not warm[0] and not warm[3] and sum(warm[5:]) >= 15
    assert np.mean(mse_on[8:]) < 0.5 * np.mean(mse_off[8:])
    assert on.registry.get_sample_value("metaagent_memory_hits_total") >= sum(warm)


def test_gates_turn_warm_starts_off():
    rng = np.random.default_rng(1)
    tasks = _line_records(rng, 10, 0.8, -1.0)
    off = _agent({"enabled": False})
    expected = [off.step(t).predictions for t in tasks]
    for memory in ({"accept_ratio": 1e-12}, {"warm_start": "off"}, {"min_similarity": 1.0}, {"skip_failed": True}):
        a = _agent(memory)
        for t, want in zip(tasks, expected):
            x = a.step(t)
            if memory.get("skip_failed"):  # these tasks all fail at first (random init): gated out
                assert all(e.failed for e in a.memory)
            assert "warm_start" not in x.flags, memory
            np.testing.assert_array_equal(x.predictions, want)


def test_accepting_against_the_adapted_loss_is_stricter():
    tasks = _line_records(np.random.default_rng(0), 3, -1.0, 2.0) + \
        _line_records(np.random.default_rng(1), 20, 0.8, -1.0, start=3)
    counts = {}
    for against in ("start", "adapted"):
        a = _agent({"accept_against": against})
        counts[against] = sum("warm_start" in a.step(t).flags for t in tasks)
    assert counts["adapted"] < counts["start"]


def test_memory_stores_absolute_adapted_heads():
    rng = np.random.default_rng(2)
    agent = _agent({})
    t = _line_records(rng, 1, 2.0, 0.0)[0]
    agent.step(t)
    entry = agent.memory.get(t.id)
    assert set(entry.state) == {"head.weight", "head.bias"}
    # An adapted head, not a change: it is the meta head plus a visible step, and a warm start
    # from it reproduces the answer's support loss without any step.
    from agent.compute import overlay

    meta_head = agent.meta["params.head.weight"].detach().numpy()
    assert not np.allclose(entry.state["head.weight"], meta_head - meta_head)
    w = overlay(agent.meta, entry.state)
    assert np.array_equal(w["params.head.weight"].detach().numpy(), entry.state["head.weight"])


@pytest.mark.parametrize("module", ["agent.memory", "agent.ivf"])
def test_doctests(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0


def test_agent_checkpoint_keeps_the_ivf_index(tmp_path):
    from agent.agent import Agent

    agent = _agent({"index_min": 6, "nlist": 2, "nprobe": 1})
    tasks = _line_records(np.random.default_rng(3), 12, 0.5, 0.0)
    for t in tasks:
        agent.step(t)
    assert agent.memory.uses_index
    agent.save(tmp_path)
    clone = Agent.load(tmp_path)
    assert clone.memory.uses_index and np.array_equal(clone.memory.index.centroids, agent.memory.index.centroids)
    for q in np.random.default_rng(4).standard_normal((20, agent.memory.dim)):
        a, sa = agent.memory.query_indices(q, 3)
        b, sb = clone.memory.query_indices(q, 3)
        assert a.tolist() == b.tolist() and sa.tolist() == sb.tolist()


def test_regression_embedding_matches_a_torch_statement_of_its_definition():
    # task_embedding computes the regression blocks in float64 numpy (few-shot sizes); here they
    # are written out again in torch from the docstring: mean feature, ridge head with an
    # intercept (penalty 0.01 x mean Gram diagonal), the five statistics; unit blocks, weights.
    from agent.nn.mlp import MLPFeatures
    from agent.nn.model import MetaModel, embed

    model = MetaModel(MLPFeatures(1, (16,)), 16, 1)
    params, _ = model.init_state(torch.Generator().manual_seed(3))
    proj = random_projection(37, 12, seed=1)
    for seed, dout in ((0, 1), (1, 2)):
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(9, 1, generator=g) * 10 - 5
        y = torch.sin(x).repeat(1, dout) * 2 + 0.3
        task = TaskTensors(x, y, x, None, "regression")
        with torch.no_grad():
            f = embed(model, params, {}, x).double()
        a = torch.cat([f, torch.ones(9, 1, dtype=torch.float64)], 1)
        gram = a.T @ a
        lam = 0.01 * float(gram.diagonal().mean()) + 1e-12
        w = torch.linalg.solve(gram + lam * torch.eye(17, dtype=torch.float64), a.T @ y.double())[:-1]
        second = w[:, 0] if dout == 1 else w.pow(2).mean(1).sqrt()
        yd = y.double()
        stats = torch.tensor([-1.0, 0.0, math.log1p(9) / 5, math.tanh(float(yd.mean())),
                              math.tanh(math.log1p(float(yd.std(unbiased=False))))], dtype=torch.float64)
        unit = lambda v: v / v.norm()  # noqa: E731
        want = torch.cat([unit(f.mean(0)), unit(second), 0.5 * unit(stats)]).numpy()
        for projection in (None, proj):
            ref = want if projection is None else want @ projection.astype(np.float64)
            ref = ref / np.linalg.norm(ref)
            got = task_embedding(model, params, task, projection=projection)
            np.testing.assert_allclose(got, ref.astype(np.float32), rtol=1e-5, atol=1e-6)
