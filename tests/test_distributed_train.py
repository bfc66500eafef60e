"""Data-parallel training on CPU through scripts/msrun_launcher.sh (mccl backend, 127.0.0.1 only).

One module fixture starts two jobs side by side (each on its own free port) and waits for them:
  * ``single``: one process, ``run_mindformer.py`` directly, batch 4;
  * ``dp``:     2 workers on one node through the launcher, per-rank batch 2 (global batch 4).
A second fixture (``finetune_runs``) runs the README's finetune form, ``--use_parallel True --load_checkpoint``, from
a .ckpt file and a Hugging Face folder as 2 nodes x 1 worker (two launcher calls, node ranks 0 and 1), and from a
converted safetensors folder as 1 node x 2 workers: the same weights (converted from that folder) on both forms of a
2-rank job, which must then print the same losses and end with the same parameters.
All use the tiny model of tests/test_training.py (TINY_MODEL), 16 rows, 1 epoch = 4 steps, shuffle off.
Fast no-msrun tests check research/deepseek2/cpu_collectives.py's AllReduce barrier, which stands in for
MindFormers' barrier() (no CPU kernel) when MindFormers itself loads a checkpoint (resuming), and changes nothing
off CPU.

Why the losses can match exactly:
  * MindDataset shards rows *strided* (shard r of n gets rows r, r+n, r+2n, ...; checked below), so with per-rank
    batch b, step k reads rows 2kb .. 2kb+2b-1 over the two ranks: the single run's batch of 2b rows in file order.
  * Every row has the same number of unmasked label tokens, so the mean of the two ranks' token means is the
    global token mean. MFLossMonitor logs each rank's local loss under data parallel (no all-reduce).
  * The MoE balance losses are turned off (their alphas set to 0): they are products of batch statistics, so a
    2-row batch and a 4-row batch give different values by design.
  * nn.TrainOneStepCell (our DeepseekV2TrainOneStepCell's base) averages gradients under DATA_PARALLEL with
    gradients_mean: the logged global gradient norm equals the single run's (a sum would double it).
"""
import glob
import os
import re
import sys
import time

import numpy as np
import pytest

from _launch import ROOT, Job, free_ports, launch_env, read_text, start_launcher, wait_all, worker_log
from conftest import TINY_MODEL, TINY_YAML, reference_batch_loss, tiny_fields, write_pattern_rows

RUNNER = os.path.join(ROOT, "run_mindformer.py")
JOB_TIMEOUT = 420            # seconds for all four jobs together
CLUSTER_TIME_OUT = "120"
ROWS, PER_RANK_BATCH, RANKS = 16, 2, 2
STEPS = ROWS // (PER_RANK_BATCH * RANKS)
LINE = re.compile(r"Epoch:\[\s*(\d+)/\s*\d+\], step:\[\s*(\d+)/\s*(\d+)\], loss:\[([0-9.eE+-]+|nan|inf)/"
                  r".*?global_norm: \[?([0-9.eE+-]+|nan|inf)")
SHARD = re.compile(r"shard_id: (\d+), num_shards: (\d+)")
SMALL = TINY_MODEL + [
    "--lr_schedule.learning_rate", "0.01", "--runner_config.epochs", "1",
    "--train_dataset.data_loader.shuffle", "False",
    "--model.model_config.aux_loss_alpha", "0.0", "--model.model_config.device_aux_loss_alpha", "0.0",
    "--model.model_config.comm_aux_loss_alpha", "0.0",
    "--callbacks", "[{type: MFLossMonitor}, {type: LossGuard}, {type: CheckpointMonitor, prefix: tiny, "
                   f"save_checkpoint_steps: {STEPS}, keep_checkpoint_max: 2, integrated_save: False}}]"]


def _batch(size):
    return ["--runner_config.batch_size", str(size), "--train_dataset.batch_size", str(size)]


def _write_rows(path):
    """ROWS rows of a learnable pattern, 33 tokens, labels masking the first 4: the same 28 counted targets."""
    write_pattern_rows(path, ROWS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start the single and dp jobs together; return their folders, exit codes and consoles."""
    tmp = tmp_path_factory.mktemp("dp")
    data = str(tmp / "rows.mindrecord")
    _write_rows(data)
    env = launch_env(tmp / "mf_default", 3)               # no PYTHONPATH: the launcher puts the project root first
    common = ["--config", TINY_YAML, "--run_mode", "train", "--train_data", data, *SMALL]
    dp_args = ["--use_parallel", "True", "--parallel_config.data_parallel", str(RANKS), *_batch(PER_RANK_BATCH)]
    port_a, = free_ports(1)
    out = {name: tmp / name for name in ("single", "dp")}

    def launcher_cmd(output_dir):
        words = [RUNNER, *common, *dp_args, "--output_dir", str(output_dir)]
        return " ".join(f"'{word}'" if " " in word else word for word in words)

    jobs = [
        Job("single", [sys.executable, RUNNER, *common, *_batch(PER_RANK_BATCH * RANKS), "--output_dir",
                       str(out["single"])], str(tmp), dict(env, PYTHONPATH=ROOT), str(tmp / "single.console")),
        start_launcher("dp", [launcher_cmd(out["dp"]), str(RANKS), str(port_a), str(tmp / "log_dp"), "True",
                              CLUSTER_TIME_OUT], str(tmp), env, str(tmp / "dp.console")),
    ]
    started = time.monotonic()
    codes = dict(zip((job.name for job in jobs), wait_all(jobs, JOB_TIMEOUT)))
    print(f"\ndistributed jobs finished in {time.monotonic() - started:.0f} s: {codes}")
    return {"tmp": tmp, "out": out, "codes": codes, "jobs": {job.name: job for job in jobs}}


def _log_lines(text):
    """[(step, loss, global_norm)] from MindFormers' loss-monitor lines, in step order."""
    found = {int(m.group(2)): (float(m.group(4)), float(m.group(5))) for m in LINE.finditer(text)}
    return [(step, *found[step]) for step in sorted(found)]


def _worker_logs(runs, kind):
    """{rank: worker log text} of job ``kind``: one log folder (log_<kind>, one node) or one a node
    (log_<kind>_<node>, 2 nodes x 1 worker)."""
    tmp = runs["tmp"]
    one_node = tmp / f"log_{kind}"
    return {rank: worker_log(one_node if one_node.is_dir() else tmp / f"log_{kind}_{rank}", rank)
            for rank in range(RANKS)}


def _check_shards(logs):
    """Each rank read its own shard of the rows (MindFormers' dataset log line)."""
    for rank, text in logs.items():
        shards = {(int(a), int(b)) for a, b in SHARD.findall(text)}
        assert shards == {(rank, RANKS)}, f"rank {rank} dataset shard lines: {shards}"


def _check_ok(runs, names, logs=None):
    """Every launcher call ``names`` exited 0; a failure shows its console (and the tails of ``logs``, worker logs)."""
    tails = "".join(f"\n{text[-3000:]}" for text in (logs or {}).values())
    for name in names:
        job = runs["jobs"][name]
        assert runs["codes"][name] == 0, f"{name} exited {runs['codes'][name]}:\n{job.console()[-4000:]}{tails}"


def _rank_checkpoints(output_dir):
    """{rank: {name: numpy array}} from output_dir/checkpoint/rank_N/*.ckpt (the step-STEPS file)."""
    import mindspore as ms
    found = {}
    for rank in range(RANKS):
        files = sorted(glob.glob(os.path.join(str(output_dir), "checkpoint", f"rank_{rank}", f"*-1_{STEPS}.ckpt")))
        assert len(files) == 1, f"rank {rank}: expected one step-{STEPS} checkpoint, found {files}"
        found[rank] = {name: value.asnumpy() for name, value in ms.load_checkpoint(files[0]).items()}
    return found


def _rank_checkpoints_single(runs):
    import mindspore as ms
    files = glob.glob(str(runs["out"]["single"] / "checkpoint" / "rank_0" / f"*-1_{STEPS}.ckpt"))
    assert len(files) == 1, files
    return {name: value.asnumpy() for name, value in ms.load_checkpoint(files[0]).items()}


def _single_losses(runs):
    _check_ok(runs, ["single"])
    lines = _log_lines(runs["jobs"]["single"].console())
    assert [step for step, _, _ in lines] == list(range(1, STEPS + 1)), runs["jobs"]["single"].console()[-3000:]
    return lines


def _check_distributed(runs, kind):
    """Shards, losses (mean of ranks == single run), gradient norm (mean, not sum), identical rank parameters."""
    logs = _worker_logs(runs, kind)
    single = _single_losses(runs)
    per_rank = {}
    _check_shards(logs)
    for rank, text in logs.items():
        per_rank[rank] = _log_lines(text)
        assert [step for step, _, _ in per_rank[rank]] == list(range(1, STEPS + 1)), text[-3000:]
        info = read_text(runs["out"][kind] / "log" / f"rank_{rank}" / "info.log")   # MindFormers' own per-rank log
        assert len(LINE.findall(info)) == STEPS
    worst_loss = worst_norm = 0.0
    for index, (step, loss, norm) in enumerate(single):
        rank_losses = [per_rank[rank][index][1] for rank in range(RANKS)]
        rank_norms = [per_rank[rank][index][2] for rank in range(RANKS)]
        assert rank_losses[0] != rank_losses[1], f"step {step}: both ranks saw the same rows ({rank_losses})"
        assert rank_norms[0] == rank_norms[1], f"step {step}: gradient norms differ across ranks {rank_norms}"
        worst_loss = max(worst_loss, abs(np.mean(rank_losses) - loss))
        worst_norm = max(worst_norm, abs(rank_norms[0] - norm) / norm)
        assert abs(np.mean(rank_losses) - loss) <= 1e-5, (step, rank_losses, loss)
        assert abs(rank_norms[0] - norm) <= 1e-5 * norm, (step, rank_norms, norm)   # averaged, not summed
    print(f"\n{kind}: max |mean rank loss - single loss| {worst_loss:.2e}, max relative norm difference "
          f"{worst_norm:.2e}")

    ckpts = _rank_checkpoints(runs["out"][kind])
    assert set(ckpts[0]) == set(ckpts[1])
    assert any(name.startswith("adam_m.") for name in ckpts[0])          # optimizer state is compared too
    for name, value in ckpts[0].items():
        assert np.array_equal(value, ckpts[1][name]), f"{name} differs between rank 0 and rank 1"
    return per_rank, ckpts


def test_minddataset_shards_rows_strided(tmp_path):
    """Shard r of 2 gets rows r, r+2, ...: the reason the single run can read the file in its natural order."""
    import mindspore.dataset as ds
    path = str(tmp_path / "rows.mindrecord")
    _write_rows(path)
    whole = [row["input_ids"] for row in ds.MindDataset(path, columns_list=["input_ids"], shuffle=False)
             .create_dict_iterator(output_numpy=True)]
    for shard in range(RANKS):
        part = [row["input_ids"] for row in ds.MindDataset(path, columns_list=["input_ids"], shuffle=False,
                                                          num_shards=RANKS, shard_id=shard)
                .create_dict_iterator(output_numpy=True)]
        assert len(part) == ROWS // RANKS
        for index, row in enumerate(part):
            assert np.array_equal(row, whole[shard + RANKS * index])


@pytest.mark.slow
@pytest.mark.msrun
def test_data_parallel_one_node_matches_single_process(runs):
    """(a) 2 workers on one node: exit 0, rank losses average to the single run's, rank parameters identical."""
    _check_ok(runs, ["dp"])
    _, ckpts = _check_distributed(runs, "dp")
    single = _rank_checkpoints_single(runs)
    worst = max(float(np.max(np.abs(value.astype(np.float64) - single[name]))) for name, value in ckpts[0].items()
                if value.dtype.kind == "f")
    print(f"dp: max |parameter(rank 0) - parameter(single)| after {STEPS} steps {worst:.2e}")
    assert worst < 1e-4                                 # same updates up to float summation order


# ---------------------------------------------------------------- finetune from a checkpoint
# The upstream README's finetune form, `--use_parallel True --load_checkpoint X --run_mode finetune` under msrun, on
# 127.0.0.1, from each way in: a .ckpt file, a converted MindSpore safetensors folder and the Hugging Face folder
# itself. Each rank loads the whole checkpoint (training.build_loaded_network) before the Trainer.
CHECKPOINT_KINDS = ("ckpt_file", "ms_folder", "hf_folder")
ONE_NODE = "ms_folder"          # 1 node x 2 workers; the others 2 nodes x 1 worker


@pytest.fixture(scope="module")
def finetune_runs(tmp_path_factory):
    """A transformers model saved as an HF folder, converted to a .ckpt file and a MindSpore safetensors folder;
    then the three finetune jobs (one per checkpoint kind; ONE_NODE's on one node) side by side."""
    import subprocess
    from reference import build_reference
    tmp = tmp_path_factory.mktemp("dp_finetune")
    data = str(tmp / "rows.mindrecord")
    _write_rows(data)
    model = build_reference(tiny_fields(), seed=5)
    model.save_pretrained(str(tmp / "hf"), safe_serialization=True)
    # rows 0 .. PER_RANK_BATCH*RANKS-1 in file order are what the two ranks read at step 1; every row has the same
    # number of counted targets, so the mean of the two ranks' means is this loss
    expected = reference_batch_loss(model, data, PER_RANK_BATCH * RANKS)       # before the jobs: no CPU contention
    checkpoints = {"ckpt_file": tmp / "tiny.ckpt", "ms_folder": tmp / "ms_folder", "hf_folder": tmp / "hf"}
    convert = os.path.join(ROOT, "research", "deepseek2", "convert_weight.py")
    for kind in ("ckpt_file", "ms_folder"):
        subprocess.run([sys.executable, convert, "--torch_ckpt_path", str(tmp / "hf"), "--mindspore_ckpt_path",
                        str(checkpoints[kind]) + ("/" if kind == "ms_folder" else "")], check=True, cwd=str(tmp),
                       env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True)

    env = launch_env(tmp / "mf_default", 3)
    jobs, ports = [], free_ports(len(CHECKPOINT_KINDS))
    for kind, port in zip(CHECKPOINT_KINDS, ports):
        words = [RUNNER, "--config", TINY_YAML, "--use_parallel", "True", "--load_checkpoint", str(checkpoints[kind]),
                 "--run_mode", "finetune", "--train_data", data, *SMALL, "--parallel_config.data_parallel",
                 str(RANKS), *_batch(PER_RANK_BATCH), "--output_dir", str(tmp / f"out_{kind}")]
        cmd = " ".join(f"'{word}'" if " " in word else word for word in words)
        if kind == ONE_NODE:
            jobs.append(start_launcher(kind, [cmd, str(RANKS), str(port), str(tmp / f"log_{kind}"), "True",
                                              CLUSTER_TIME_OUT], str(tmp), env, str(tmp / f"{kind}.console")))
            continue
        for node in range(RANKS):
            jobs.append(start_launcher(f"{kind}_node{node}", [cmd, str(RANKS), "1", "127.0.0.1", str(port),
                                                             str(node), str(tmp / f"log_{kind}_{node}"), "True",
                                                             CLUSTER_TIME_OUT],
                                       str(tmp), env, str(tmp / f"{kind}_{node}.console")))
    started = time.monotonic()
    codes = dict(zip((job.name for job in jobs), wait_all(jobs, JOB_TIMEOUT + 180)))
    print(f"\nfinetune jobs finished in {time.monotonic() - started:.0f} s: {codes}")
    return {"tmp": tmp, "codes": codes, "jobs": {job.name: job for job in jobs}, "expected": expected,
            "checkpoints": checkpoints}


def _finetune_ok(run, kind):
    """{rank: worker log} of finetune job ``kind`` after asserting its launcher call(s) exited 0."""
    logs = _worker_logs(run, kind)
    _check_ok(run, [kind] if kind == ONE_NODE else [f"{kind}_node{node}" for node in range(RANKS)], logs)
    return logs


@pytest.mark.slow
@pytest.mark.msrun
@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
def test_finetune_from_checkpoint_under_msrun(finetune_runs, kind):
    """README's finetune form under msrun (2 nodes x 1 worker; ONE_NODE's 1 node x 2 workers): both ranks exit 0,
    each read its shard and loaded every weight, the first losses average to transformers' loss of the same
    weights on the first global batch, ranks end equal."""
    run = finetune_runs
    logs = _finetune_ok(run, kind)
    _check_shards(logs)
    firsts = []
    for rank, text in logs.items():
        assert "holds every weight of the model" in text and "every weight of the network" in text, text[-3000:]
        lines = _log_lines(text)
        assert [step for step, _, _ in lines] == list(range(1, STEPS + 1)), text[-3000:]
        firsts.append(lines[0][1])
    assert firsts[0] != firsts[1], f"both ranks saw the same rows ({firsts})"
    expected = run["expected"]
    assert abs(expected - np.log(64)) > 1e-3, expected          # far from a fresh init's loss, by 50x the tolerance
    print(f"\n{kind}: first losses {firsts}, mean {np.mean(firsts):.6f}, transformers on the first global batch "
          f"{expected:.6f}")
    assert abs(np.mean(firsts) - expected) <= 2e-5, (firsts, expected)
    ckpts = _rank_checkpoints(run["tmp"] / f"out_{kind}")
    assert set(ckpts[0]) == set(ckpts[1])
    assert any(name.startswith("adam_m.") for name in ckpts[0])
    for name, value in ckpts[0].items():
        assert np.array_equal(value, ckpts[1][name]), f"{name} differs between rank 0 and rank 1"


@pytest.mark.slow
@pytest.mark.msrun
def test_two_nodes_match_one_node(finetune_runs):
    """The same weights (a .ckpt and a safetensors folder converted from one HF folder) finetuned as 2 nodes x 1
    worker and as 1 node x 2 workers: the same losses and norms printed rank by rank, the same parameters after."""
    two = {rank: _log_lines(text) for rank, text in _finetune_ok(finetune_runs, "ckpt_file").items()}
    one = {rank: _log_lines(text) for rank, text in _finetune_ok(finetune_runs, ONE_NODE).items()}
    assert two == one
    reference = _rank_checkpoints(finetune_runs["tmp"] / f"out_{ONE_NODE}")[0]
    for name, value in _rank_checkpoints(finetune_runs["tmp"] / "out_ckpt_file")[0].items():
        assert np.array_equal(value, reference[name]), f"{name}: the 2-node run differs from the 1-node run"


def test_install_cpu_barrier_is_a_noop_unless_distributed_cpu(monkeypatch):
    """No communication initialised (a single-process run), or a device other than CPU (Ascend/GPU, even with
    communication initialised): nothing is rebound."""
    import importlib
    import mindspore as ms
    from mindspore.communication import GlobalComm
    from research.deepseek2.run import cpu_barrier as cc
    before = {(mod, name): getattr(importlib.import_module(mod), name) for mod, name, _ in cc.PATCHED_NAMES}

    monkeypatch.setattr(GlobalComm, "INITED", False)
    assert ms.get_context("device_target") == "CPU"
    assert not cc.should_install() and cc.install_cpu_barrier() == []

    real_get_context = ms.get_context
    monkeypatch.setattr(GlobalComm, "INITED", True)
    for device in ("Ascend", "GPU"):
        monkeypatch.setattr(ms, "get_context",
                            lambda key, _d=device: _d if key == "device_target" else real_get_context(key))
        assert not cc.should_install() and cc.install_cpu_barrier() == []
    after = {(mod, name): getattr(importlib.import_module(mod), name) for mod, name, _ in cc.PATCHED_NAMES}
    assert after == before


def test_install_cpu_barrier_rebinds_exactly_mindformers_barrier_names(monkeypatch):
    """On a distributed CPU run: exactly PATCHED_NAMES, each of which was one of MindSpore's barriers (comm_func's,
    bound by MindFormers 1.9, or mint.distributed's, bound by 2.1) or MindFormers' barrier_world over it, now the
    AllReduce barrier; MindSpore's own barriers are left alone."""
    import importlib
    from mindspore.communication import GlobalComm
    from mindformers.utils import parallel_utils
    from research.deepseek2.run import cpu_barrier as cc
    barriers = cc.mindspore_barriers()
    assert barriers and all(callable(b) for b in barriers)
    originals = {}
    for mod, name, _ in cc.PATCHED_NAMES:
        module = importlib.import_module(mod)
        bound = getattr(module, name)
        expected = barriers if name == "barrier" else (parallel_utils.barrier_world,)
        assert any(bound is b for b in expected), f"{mod}.{name}"
        originals[(mod, name)] = bound
        monkeypatch.setattr(module, name, bound)                     # restored after the test
    monkeypatch.setattr(GlobalComm, "INITED", True)
    patched = cc.install_cpu_barrier()
    assert patched == [f"{mod}.{name}" for mod, name, _ in cc.PATCHED_NAMES]
    assert {"mindformers.trainer.utils.barrier", "mindformers.utils.load_checkpoint_utils.barrier"} <= set(patched)
    for mod, name, _ in cc.PATCHED_NAMES:
        assert getattr(importlib.import_module(mod), name) is \
            {"barrier": cc.cpu_barrier, "barrier_world": cc.cpu_barrier_world}[name]
    assert cc.mindspore_barriers() == barriers and parallel_utils.barrier_world is \
        originals[("mindformers.tools.resume_ckpt", "barrier_world")]
    assert cc.install_cpu_barrier() == patched                      # again: harmless
