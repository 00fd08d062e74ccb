"""mlx_qsdpa.distributed over real ranks: 2 processes on this machine,
started by MLX's launcher (``mlx.launch -n 2``, ring backend over TCP on
127.0.0.1, CPU).

One launched run (tests/distributed_worker.py, module fixture ``ranks``)
computes everything; the tests compare it with this process's single-process
results and the float64 oracle. The run is bounded by ``LAUNCH_TIMEOUT``: a
hung collective fails the tests (the launcher's process group is killed)
instead of blocking the suite.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig

import mlx.core as mx
import numpy as np
import pytest

import oracle
from distributed_worker import OP_CASES, format_args, shard
from qsdpa_case import Case, assert_matches, build, reference, scale_of, tol_dtype
from mlx_qsdpa import quant_sdpa

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")
LAUNCH_TIMEOUT = 240  # seconds; the run takes ~15 s on 2 shared cores

HAVE_MLX_LM = True
try:
    import mlx_lm  # noqa: F401
except ModuleNotFoundError:
    HAVE_MLX_LM = False
needs_mlx_lm = pytest.mark.skipif(not HAVE_MLX_LM, reason="mlx-lm is not installed (pip install 'mlx-qsdpa[mlx-lm]')")


def _free_port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 (the ring backend listens
    on one port per rank from --starting-port), so that runs of this test
    beside each other do not collide on the launcher's default port."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def _launcher() -> str:
    """MLX's ``mlx.launch`` script of this environment."""
    path = os.path.join(sysconfig.get_path("scripts"), "mlx.launch")
    if not os.path.exists(path):
        path = os.path.join(os.path.dirname(sys.executable), "mlx.launch")
    assert os.path.exists(path), f"mlx.launch not found next to {sys.executable}"
    return path


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each rank's results (a dict per rank) of one launched worker run."""
    outdir = tmp_path_factory.mktemp("ranks")
    cmd = [
        _launcher(), "-n", "2", "--backend", "ring", "--starting-port", str(_free_port_pair()),
        "--python", sys.executable, "--", WORKER, str(outdir),
    ]  # fmt: skip
    if HAVE_MLX_LM:
        import test_mlx_lm as t

        model_dir = tmp_path_factory.mktemp("model")
        (model_dir / "prompt.txt").write_text(t._saved_model(model_dir))
        cmd.append(str(model_dir))
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        log, _ = proc.communicate()
        pytest.fail(f"the 2-rank run did not finish in {LAUNCH_TIMEOUT} s; its output:\n{log[-4000:]}")
    assert proc.returncode == 0, f"the 2-rank run failed ({proc.returncode}):\n{log[-4000:]}"
    out = []
    for r in range(2):
        path = outdir / f"rank{r}.npz"
        assert path.exists(), f"rank {r} wrote no results:\n{log[-4000:]}"
        with np.load(path) as f:
            out.append(dict(f))
    return out


def test_ranks_get_the_same_results(ranks):
    # Every rank merges the same gathered values: the same bits everywhere
    # (what keeps their generations in step).
    assert ranks[0].keys() == ranks[1].keys()
    for k in ranks[0]:
        if k.startswith("command_"):  # rank 0 prints, the others do not
            continue
        assert np.array_equal(ranks[0][k], ranks[1][k], equal_nan=True), k


@pytest.mark.parametrize("i", range(len(OP_CASES)), ids=[str(oc.case) + f"-cut{oc.cut}" for oc in OP_CASES])
def test_sharded_quant_sdpa_two_ranks(ranks, i):
    c, cut = OP_CASES[i]
    q, kq, vq, mask, sinks = inputs = build(c)
    out, lse = ranks[0][f"op{i}_out"], ranks[0][f"op{i}_lse"]
    assert {shard(c, cut, r) for r in range(2)} == {(0, cut), (cut, c.Lk)}
    got = mx.array(out).astype(c.dtype)
    # Against the oracle, and against one process's quant_sdpa over the whole cache.
    assert_matches(c, got, mx.array(lse), *reference(c, *inputs))
    single, single_lse = quant_sdpa(
        q, *kq, *vq, scale=scale_of(c), mask=mask, sinks=sinks, return_lse=True, **format_args(c)
    )
    oracle.assert_close(got, oracle.to_numpy(single), tol_dtype(c), "2 ranks vs 1 process")
    oracle.assert_lse_close(lse, np.array(single_lse).astype(np.float64), "2 ranks vs 1 process")


# ---------------------------------------------------------------------------
# mlx-lm
# ---------------------------------------------------------------------------


class _FakeGroup:
    """What ContextParallelKVCache.update_and_fetch reads of a group."""

    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


@needs_mlx_lm
def test_context_parallel_cache_places_each_update_whole_on_the_emptiest_rank():
    import mlx_qsdpa.mlx_lm as qlm
    from mlx_qsdpa.distributed import ContextParallelKVCache

    kv = mx.random.normal((1, 2, 64, 64))
    with qlm.patched():
        caches = [ContextParallelKVCache(bits=4, group=_FakeGroup(r, 3)) for r in range(3)]
        held = [[] for _ in caches]
        for n in (64, 64, 21, 1, 1, 1, 1, 1):
            for r, c in enumerate(caches):
                keys, _ = c.update_and_fetch(kv[..., :n, :], kv[..., :n, :])
                held[r].append((c.holds_update, keys[0].shape[2]))
    # Rank 0 takes the first chunk, 1 the second, 2 the third (21 tokens),
    # then the decoded tokens go to the emptiest rank: 2, 2, 2, ... until it
    # catches up; exactly one rank takes each update.
    takers = [[r for r in range(3) if held[r][i][0]] for i in range(8)]
    assert takers == [[0], [1], [2], [2], [2], [2], [2], [2]]
    assert caches[0].rank_lengths == [64, 64, 26] and all(c.offset == 154 for c in caches)
    assert [h[-1][1] for h in held] == [64, 64, 26]  # the tokens each rank returns: its own
    assert held[2][0] == (False, 0)  # nothing held yet: zero keys


@needs_mlx_lm
def test_context_parallel_cache_one_rank_equals_quant_sdpa_cache():
    # A group of one holds every token: the same tokens and log-probabilities
    # as QuantSDPAKVCache, bit for bit.
    import test_mlx_lm as t
    import mlx_qsdpa.distributed as dist
    import mlx_qsdpa.mlx_lm as qlm

    model = t.make_llama()
    try:
        ref = t.generate(model, t.prompt_tokens(), prompt_cache=qlm.make_cache(model, bits=4))
        cache = dist.make_cache(model, bits=4)
        got = t.generate(model, t.prompt_tokens(), prompt_cache=cache)
    finally:
        qlm.unpatch()
    assert all(isinstance(c, dist.ContextParallelKVCache) for c in cache)
    assert ref[0] == got[0] and mx.array_equal(ref[1], got[1])
    c = cache[0]
    with pytest.raises(ValueError, match="sliding window"):
        c.make_mask(4, window_size=16)
    with pytest.raises(ValueError, match="saved prompt cache"):
        c.state = c.state
    assert not c.is_trimmable() and c.size() == c.offset == t.PROMPT + t.STEPS


@needs_mlx_lm
@pytest.mark.parametrize("name", ["llama", "gpt_oss"])
def test_context_parallel_generation_two_ranks(ranks, name):
    """Greedy tokens of 2 ranks, each holding about half the cache, equal
    one process's over the same caches (QuantSDPAKVCache for full attention;
    gpt-oss keeps mlx-lm's RotatingKVCache for its window layer, and its
    sinks are counted by rank 0)."""
    import test_mlx_lm as t
    import mlx_qsdpa.mlx_lm as qlm
    from mlx_lm.models import cache as C

    model = {"llama": t.make_llama, "gpt_oss": t.make_gpt_oss}[name]()
    cache = [qlm.QuantSDPAKVCache(bits=4) if type(c) is C.KVCache else c for c in C.make_prompt_cache(model)]
    with qlm.patched():
        ref = t.generate(model, t.prompt_tokens(), prompt_cache=cache)
    got = (list(ranks[0][f"cp_{name}_tokens"]), mx.array(ranks[0][f"cp_{name}_logprobs"]))
    t.assert_same_generation(ref, got)
    lengths = ranks[0][f"cp_{name}_rank_lengths"]
    assert lengths.sum() == t.PROMPT + t.STEPS and min(lengths) > 0 and abs(lengths[0] - lengths[1]) <= t.CHUNK


@needs_mlx_lm
def test_patch_under_tensor_parallel_model_two_ranks(ranks):
    """mlx-lm's tensor parallelism (``model.shard(group)``: each rank half
    the heads) with the patch: every quantized attention call goes through
    quant_sdpa, and the greedy tokens equal the unsharded model's."""
    import test_mlx_lm as t
    import mlx_qsdpa.mlx_lm as qlm

    model = t.make_llama()
    with qlm.patched():
        ref = t.generate(model, t.prompt_tokens(), kv_bits=4, kv_group_size=64, quantized_kv_start=0)
    routed, fallback = ranks[0]["tp_stats"]
    assert routed > 0 and fallback == 0
    t.assert_same_generation(ref, (list(ranks[0]["tp_tokens"]), mx.array(ranks[0]["tp_logprobs"])))


@needs_mlx_lm
def test_generate_command_two_ranks(ranks, tmp_path, monkeypatch, capsys):
    """``mlx.launch -n 2 ... -m mlx_qsdpa.distributed``: rank 0 prints the
    text a single process prints (a group of one), rank 1 nothing; both
    ranks hold tokens."""
    import mlx_qsdpa.distributed as dist
    import test_mlx_lm as t
    from distributed_worker import GENERATE_ARGS

    prompt = t._saved_model(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mlx_qsdpa.distributed", *GENERATE_ARGS, "--model", str(tmp_path), "--prompt", prompt])
    assert dist._generate_command() == 0
    single = capsys.readouterr()
    assert "context-parallel over 1 rank(s)" in single.err
    text = single.out.split("==========")[1].strip()
    assert len(set(text.split())) > 8
    assert str(ranks[0]["command_stdout"]).split("==========")[1].strip() == text
    assert str(ranks[1]["command_stdout"]) == ""
    held = re.search(r"context-parallel over 2 rank\(s\): tokens held per rank \[(\d+), (\d+)\]", str(ranks[0]["command_stderr"]))
    assert held and min(int(held[1]), int(held[2])) > 0, str(ranks[0]["command_stderr"])
