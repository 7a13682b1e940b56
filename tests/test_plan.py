"""`jaxpost plan`: the per-device breakdown, the fit verdict with measured suggestions, errors, and accuracy."""

from __future__ import annotations

import gc
import json
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest
from cli_env import subprocess_env

REPO = Path(__file__).resolve().parents[1]
TINY = ["--gin_file=configs/models/tiny.gin"]
SFT = ["--gin_file=configs/runs/sft.gin", *TINY, "--gin.sft.seq_len=64"]
GRPO = ["--gin_file=configs/runs/grpo.gin", *TINY, "--gin.RolloutConfig.max_new_tokens=16",
        "--gin.OnlineConfig.max_prompt_len=16", "--gin.OnlineConfig.prompts_per_rollout=8",
        "--gin.RolloutConfig.group_size=2"]


def _cli_plan(args, tmp_path, capfd):
    """``jaxpost plan ARGS --json`` as a user runs it: (exit status, stdout, stderr, the JSON plan or None).

    The test process lacks the planning XLA flags (``jaxpost.plan.PLAN_XLA_FLAGS``), so a plan runs in the
    subprocess ``jaxpost plan`` starts for itself: pass ``capfd``, which sees its output.
    """
    from jaxpost.cli import main

    out = tmp_path / "plan.json"
    out.unlink(missing_ok=True)
    rc = main(["plan", *args, "--json", str(out)])
    text = capfd.readouterr()
    return rc, text.out, text.err, (json.loads(out.read_text()) if out.exists() else None)


PLAN_TIMEOUT_S = 300


class PlanProcess:
    """One planning process for the module (``tests/plan_worker.py``): ``jaxpost plan`` runs there in-process.

    It is started as ``jaxpost plan`` starts its subprocess (``XLA_FLAGS`` from ``plan_xla_flags(8)``: the
    test flags, 8 devices and the planning flags; ``JAX_PLATFORMS=cpu``), so each 8-device plan runs the code
    the user's command runs in that subprocess, without importing JAX and jaxpost anew (seconds) each time.
    """

    def __init__(self, log: Path):
        from jaxpost.plan import _CHILD_ENV, plan_xla_flags

        env = subprocess_env(**{"XLA_FLAGS": plan_xla_flags(8), "JAX_PLATFORMS": "cpu", _CHILD_ENV: "1"})
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "plan_worker.py")], cwd=REPO, env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=f, text=True)

    def run(self, request: dict, tmp_path: Path) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) of one request (see ``tests/plan_worker.py``)."""
        out, err = tmp_path / "plan.out", tmp_path / "plan.err"
        self.proc.stdin.write(json.dumps({**request, "out": str(out), "err": str(err)}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], PLAN_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise AssertionError(f"the planning process {'exited' if ready else 'timed out'}:\n"
                                 f"{self.log.read_text()[-3000:]}")
        return json.loads(line)["rc"], out.read_text(), err.read_text()

    def plan(self, args, tmp_path):
        """``jaxpost plan ARGS --json`` there: (exit status, stdout, stderr, the JSON plan or None)."""
        out = tmp_path / "plan.json"
        out.unlink(missing_ok=True)
        rc, stdout, stderr = self.run({"argv": [*args, "--json", str(out)]}, tmp_path)
        return rc, stdout, stderr, (json.loads(out.read_text()) if out.exists() else None)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def planner(tmp_path_factory):
    """The module's planning process (:class:`PlanProcess`), started at its first plan's test."""
    process = PlanProcess(tmp_path_factory.mktemp("plan_worker") / "worker.log")
    yield process
    process.close()


def test_sft_breakdown_on_8_devices(tmp_path, planner):
    rc, out, _, plan = planner.plan([*SFT, "--devices", "8", "--device_kind", "h100"], tmp_path)
    assert rc == 0, out
    for line in ("parameters", "optimizer state", "gradients", "XLA temporaries (train step)", "peak",
                 "fits in 80.00 GiB", "FLOPs (XLA)", "ms per step", "estimate: XLA CPU compile"):
        assert line in out, (line, out)
    assert plan["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and plan["devices"] == 8
    # Exact from shapes: fp32 params split 8 ways over fsdp (the tiny model's dimensions all divide, except
    # norm scales, which stay whole); Adam holds two copies of them.
    assert plan["num_params"] * 4 / 8 <= plan["params"] <= plan["num_params"] * 4 / 8 + 4 * 64 * 5
    assert plan["optimizer"] >= 2 * plan["params"] and plan["gradients"] == plan["params"]
    assert plan["peak"] == plan["step_arguments"] + plan["step_outputs"] - plan["step_aliased"] + plan["step_temp"]
    assert plan["xla_flops"] > 0 and plan["model_flops"] > 0 and plan["fits"]


def test_grpo_breakdown_on_8_devices(tmp_path, planner):
    rc, out, _, plan = planner.plan([*GRPO, "--devices", "8", "--device_kind", "v5e"], tmp_path)
    assert rc == 0, out
    for line in ("frozen model: reference", "KV cache (rollouts)", "peak (rollout: sampler program)",
                 "peak (train step)", "fits in 16.00 GiB"):
        assert line in out, (line, out)
    assert plan["frozen"]["reference"] == plan["params"]  # a copy of the policy, sharded alike
    # KV cache: 2 (k, v) x layers x rows x kv_heads x slots x head_dim x fp32, the batch split 8 ways.
    # 8 prompts x 2 samples; at its largest the cache holds 16 prompt + 16 new tokens; plus int32 segment
    # ids per slot and the int32 fill index.
    assert plan["kv_cache"] == 2 * 2 * (16 // 8) * 2 * 32 * 16 * 4 + (16 // 8) * 32 * 4 + 4
    assert plan["peak"] == max(plan["step_peak"], plan["rollout_peak"]) > 0


def test_rollouts_offer_decoding_without_the_fused_copies(monkeypatch):
    """``SamplingConfig.fuse_projections = False`` is a suggestion of online plans while it is on, and the
    planned sampler holds the stacked copies more with it on.

    In this process (8 devices, without the planning flags: only the two plans' difference matters), data
    parallel: replicated weights, so the copies are whole and live through the decode loop, the peak.
    """
    from jaxpost import config
    from jaxpost.plan.core import plan_current

    monkeypatch.chdir(REPO)
    files, bindings, _ = config.split_gin_args([*GRPO, "--gin_file=configs/mesh/data_parallel.gin"])
    plans = {}
    for fuse in (True, False):
        config.parse(files, [*bindings, "ModelConfig.intermediate_size = 1024",
                             f"SamplingConfig.fuse_projections = {fuse}"], finalize=False)
        plans[fuse] = plan_current(8)
    offered = {fuse: [b for _, extra in plan.settings["options"] for b in extra] for fuse, plan in plans.items()}
    assert "SamplingConfig.fuse_projections = False" in offered[True]
    assert not any("fuse_projections" in b for b in offered[False])
    # 2 layers' stacked q/k/v ([64, 64 + 2 x 16]) and gate/up ([64, 2 x 1024]) kernels, fp32, replicated
    copies = 2 * 64 * (64 + 2 * 16 + 2 * 1024) * 4
    # The copies, give or take XLA's placement of small temporaries (measured: 16,336 bytes more, 1.5%).
    assert 0.98 * copies <= plans[True].rollout_peak - plans[False].rollout_peak <= 1.02 * copies
    assert plans[True].step_peak == plans[False].step_peak


def test_grpo_with_a_reward_model_holds_it_beside_the_step(tmp_path, planner):
    """No such directory: the reward model is assumed policy-sized (a score head instead of the LM head)."""
    args = [*GRPO, "--gin.make_scorer.reward_model=no/such/rm", "--devices", "8", "--no_suggestions"]
    rc, out, _, plan = planner.plan(args, tmp_path)
    assert rc == 0 and "frozen model: reward model" in out and "assumed policy-sized" in out
    assert 0 < plan["frozen"]["reward model"] < plan["params"]  # 64 score weights instead of 256 x 64 logits


@pytest.mark.parametrize("method,frozen", [("dpo", "reference"), ("kto", "reference"), ("reward", None),
                                           ("distill", "teacher")])
def test_every_offline_method_plans(method, frozen, tmp_path, planner):
    """Each method's entry compiles; frozen models the step reads are counted (a teacher from its config.json)."""
    from jaxpost.models.config import ModelConfig
    from jaxpost.models.hf import model_config_to_hf_config

    teacher = ModelConfig(num_layers=3, hidden_size=128, intermediate_size=256)
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text(json.dumps(model_config_to_hf_config(teacher)))
    args = [f"--gin_file=configs/runs/{method}.gin", *TINY, f"--gin.{method}.seq_len=64", "--devices", "8"]
    if method == "distill":
        args.append(f"--gin.distill.teacher_from={tmp_path / 'teacher'}")
    if method == "reward":
        args[2] = "--gin.reward_model.seq_len=64"
    rc, out, _, plan = planner.plan([*args, "--no_suggestions"], tmp_path)
    assert rc == 0, out
    if frozen == "reference":
        assert plan["frozen"] == {"reference": plan["params"]}
    elif frozen == "teacher":
        assert 0 < plan["frozen"]["teacher"] and plan["frozen"]["teacher"] != plan["params"]
    else:
        assert plan["frozen"] == {}


def _teacher_dir(tmp_path) -> str:
    from jaxpost.models.config import ModelConfig
    from jaxpost.models.hf import model_config_to_hf_config

    teacher = ModelConfig(num_layers=3, hidden_size=128, intermediate_size=256)
    (tmp_path / "teacher").mkdir(exist_ok=True)
    (tmp_path / "teacher" / "config.json").write_text(json.dumps(model_config_to_hf_config(teacher)))
    return str(tmp_path / "teacher")


ROLLOUT = ["--gin.RolloutConfig.max_new_tokens=16", "--gin.OnlineConfig.max_prompt_len=16",
           "--gin.OnlineConfig.prompts_per_rollout=8"]


@pytest.mark.parametrize("method", ["ppo", "online_dpo", "distill_on_policy"])
def test_every_online_method_plans_its_step_and_sampler(method, tmp_path, planner):
    """PPO (policy + value model trained together), online DPO (reference as a step argument) and on-policy
    distillation (the teacher as a step argument) each compile their step and their sampler; the KV cache and
    the frozen models are counted, and the rollout peak holds what stays on the devices while sampling."""
    if method == "distill_on_policy":
        args = ["--gin_file=configs/runs/distill.gin", *TINY, "--gin.distill.mode='on_policy'",
                "--gin.distill.seq_len=64", f"--gin.distill.teacher_from={_teacher_dir(tmp_path)}"]
    else:
        args = [f"--gin_file=configs/runs/{method}.gin", *TINY, *ROLLOUT, "--gin.RolloutConfig.group_size=2"]
    rc, out, err, plan = planner.plan([*args, "--devices", "8", "--no_suggestions"], tmp_path)
    assert rc == 0, out + err
    assert "KV cache (rollouts)" in out and plan["kv_cache"] > 0 and plan["rollout_peak"] > 0
    assert plan["peak"] == max(plan["step_peak"], plan["rollout_peak"])
    if method == "ppo":
        # params = {"policy", "value"}: the value model is the policy's body with a 1-wide score head instead
        # of the (untied) [64, 256] LM head, both split over fsdp; Adam holds two of each; the reference copies the policy only.
        policy = plan["frozen"]["reference"]
        assert plan["params"] == policy + (policy - 64 * 256 * 4 // 8 + 64 * 4 // 8)  # kernels split 8 ways
        assert plan["optimizer"] >= 2 * plan["params"] and "policy + value model" in out
        assert plan["step_peak"] == plan["step_arguments"] + plan["step_outputs"] - plan["step_aliased"] \
            + plan["step_temp"] + policy  # the reference is held beside the step
    elif method == "online_dpo":
        assert plan["frozen"] == {"reference": plan["params"]} and "8 pairs" in out  # one pair per prompt
        assert plan["step_peak"] == plan["step_arguments"] + plan["step_outputs"] - plan["step_aliased"] \
            + plan["step_temp"]  # the reference is a step argument, not held beside it
    else:
        assert 0 < plan["frozen"]["teacher"] != plan["params"] and "the student samples 32 tokens" in out
        # 8 rows sample 32 new tokens after 32-token prompts, 1 sample each: 64 slots, rows split 8 ways.
        assert plan["kv_cache"] == 2 * 2 * 1 * 2 * 64 * 16 * 4 + 1 * 64 * 4 + 4


_CONTINUAL = """
import json, sys
from jaxpost import config
from jaxpost.plan import core, methods
from jaxpost.sharding import Partitioner
files, bindings, _ = config.split_gin_args(sys.argv[1:])
config.parse(files, bindings, finalize=False)
plan = core.plan_current(8)
part = Partitioner()
with part.activate():
    steps = {s.shape_note.split(":")[0]: core._plan_setup(s, part, 8).peak for s in methods.plan_continual(part)}
print(json.dumps({"peak": plan.peak, "note": plan.shape_note, "frozen": plan.frozen, "params": plan.params,
                  "method": plan.method, "steps": steps}))
"""


def test_continual_plans_the_larger_of_its_round_steps(tmp_path, planner):
    """A continual round runs KTO then DPO, each with a copy of init_from as the reference; the plan is the step
    with the larger peak. (In the planning process, with the planning flags, as ``jaxpost plan`` runs.)"""
    args = ["--gin_file=configs/runs/continual.gin", *TINY, "--gin.continual.seq_len=64"]
    script = tmp_path / "continual_plan.py"
    script.write_text(_CONTINUAL)
    rc, out, err = planner.run({"python": [str(script), *args]}, tmp_path)
    assert rc == 0, err[-3000:]
    r = json.loads(out.strip().splitlines()[-1])
    assert r["method"] == "continual" and set(r["steps"]) == {"round step KTO", "round step DPO"}
    assert r["peak"] == max(r["steps"].values()) and r["note"].startswith(max(r["steps"], key=r["steps"].get))
    assert r["frozen"] == {"reference": r["params"]}


def test_plan_xla_flags_keep_the_users_and_add_the_plans():
    from jaxpost.plan import PLAN_XLA_FLAGS, plan_xla_flags

    flags = plan_xla_flags(4, "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=8 "
                              "--xla_disable_hlo_passes=my-pass")
    assert flags.split()[0] == "--xla_backend_optimization_level=0"
    assert "--xla_force_host_platform_device_count=4" in flags.split() and "count=8" not in flags
    assert "--xla_cpu_enable_concurrency_optimized_scheduler=false" in flags.split()
    # One list of disabled passes (a second --xla_disable_hlo_passes would replace the first).
    assert flags.count("--xla_disable_hlo_passes=") == 1 and "my-pass,cpu-all-reduce-combiner" in flags
    assert plan_xla_flags(4, flags) == flags and all(f.split("=")[0] in flags for f in PLAN_XLA_FLAGS)


def test_fsdp_temporaries_do_not_hold_every_layers_weights(tmp_path, planner):
    """Regression (issue 21): with full remat, an FSDP step needs about one layer's gathered weights at a time.

    XLA:CPU's default schedule issued every all-gather up front and its all-reduce combiner chained every
    layer's gradient reduction to the end of the backward pass: 4 more layers added about 2x their float32
    weights to the temporaries (measured with default flags: 31.5 MB per layer of 15.7 MB). The plan's flags
    remove both; what is left per layer is the whole float32 gradient XLA:CPU keeps in place of a
    reduce-scatter (about 1x; docs/plan.md).
    """
    base = [*SFT, "--gin.ModelConfig.hidden_size=512", "--gin.ModelConfig.intermediate_size=2048",
            "--gin.ModelConfig.num_heads=8", "--gin.ModelConfig.num_kv_heads=4", "--gin.ModelConfig.remat='full'",
            "--gin.sft.seq_len=32", "--devices", "8", "--no_suggestions"]
    plans = {}
    for layers in (2, 6):
        rc, out, err, plans[layers] = planner.plan([*base, f"--gin.ModelConfig.num_layers={layers}"], tmp_path)
        assert rc == 0, out + err
    layer_f32 = (plans[6]["num_params"] - plans[2]["num_params"]) * 4  # 4 layers' weights in float32
    growth = plans[6]["step_temp"] - plans[2]["step_temp"]
    assert growth < 1.5 * layer_f32, (growth, layer_f32)


def test_does_not_fit_prints_measured_suggestions(tmp_path, capfd):
    """4 devices from this 8-device process: the plan runs in a subprocess (XLA_FLAGS device count 4).

    Through ``jaxpost plan``'s command line in this process, so its re-run in a subprocess is the user's."""
    args = [*SFT, "--gin_file=configs/mesh/data_parallel.gin", "--gin.ModelConfig.remat='full'", "--devices", "4",
            "--device_kind", "v5e", "--device_memory_gb", "0.0005"]
    rc, out, err, plan = _cli_plan(args, tmp_path, capfd)
    assert rc == 1, out + err
    assert "does NOT fit in 0.51 MiB" in out and "mesh: data=4 x fsdp=1" in out
    names = [s["setting"] for s in plan["suggestions"]]
    assert any(n.startswith("FSDP over all devices") for n in names) and any(n.startswith("LoRA") for n in names)
    assert "LoopConfig.grad_accum_steps = 2" in names  # 8 rows over 4 batch shards: 2 per shard
    fsdp = next(s for s in plan["suggestions"] if s["setting"].startswith("FSDP"))
    assert fsdp["saves"] > 0 and fsdp["saves"] == plan["peak"] - fsdp["peak"]  # measured, not guessed
    assert "saves" in out and "Largest single saving" in out


def test_wrong_key_names_it(tmp_path, capfd):
    rc, _, err, plan = _cli_plan([*SFT, "--gin.sft.seq_lenn=64", "--devices", "8"], tmp_path, capfd)
    assert rc == 2 and plan is None
    assert err.startswith("jaxpost: error:") and "sft.seq_lenn" in err


def test_a_value_out_of_range_names_it_before_anything_compiles(tmp_path, capfd):
    rc, _, err, plan = _cli_plan([*SFT, "--gin.make_optimizer.b1=1.5", "--devices", "8"], tmp_path, capfd)
    assert rc == 2 and plan is None
    assert err == "jaxpost: error: make_optimizer.b1 must be in [0, 1), got 1.5\n"


def test_unknown_device_kind(tmp_path, capfd):
    rc, _, err, _ = _cli_plan([*SFT, "--devices", "8", "--device_kind", "a100"], tmp_path, capfd)
    assert rc == 2 and "--device_kind='a100' is unknown" in err


# --- accuracy: planned peak vs the measured peak of the same step ------------------------------------

ACCURACY_RUNS = {
    "sft": ["--gin_file=configs/runs/sft.gin", "--gin_file=configs/models/bench.gin", "--gin.sft.seq_len=512",
            "--gin.sft.batch_size=8"],
    # Logits recomputed per chunk in the backward pass, every layer rematerialised: another memory profile.
    "sft_chunked": ["--gin_file=configs/runs/sft.gin", "--gin_file=configs/models/bench.gin",
                    "--gin.sft.seq_len=256", "--gin.sft.batch_size=16", "--gin.sft.chunk_size=128",
                    "--gin.ModelConfig.stored_logits_mib=0", "--gin.ModelConfig.remat='full'"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ACCURACY_RUNS))
def test_planned_peak_matches_measured_peak(name):
    """The planned peak of a small SFT run is within 20% of the peak measured when the same step runs.

    Measurement (a fresh subprocess with one CPU device, where ``memory_stats()`` is None): the step is built
    the way ``jaxpost.train.fit`` builds it (real params from ``load_model``, ``init_sharded_state``,
    ``compile_train_step``) and run once to warm up. Then, with the state and a batch on the device,
    ``measured = live + growth``: ``live`` is the bytes of every live ``jax.Array`` (exact: the step's
    arguments), and ``growth`` is how far the process's peak resident memory rises above its resident
    memory while the step runs once more: the peak (``VmHWM``) is reset first by writing 5 to
    ``/proc/self/clear_refs`` and read from ``/proc/self/status`` after ``block_until_ready``. XLA's CPU
    runtime allocates the step's temporaries and non-donated outputs from the heap for each run, so the
    growth is what they really touch, measured by the OS rather than taken from XLA's own accounting.
    The plan comes from ``plan_current``, the engine of ``jaxpost plan``, compiled from shapes only.
    """
    from jaxpost.plan import plan_xla_flags

    # The planning flags in both: the plan and the measured run compile the same program the same way.
    env = subprocess_env(XLA_FLAGS=plan_xla_flags(1, ""), JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # a cached executable would skip the compile either way; keep it simple
    proc = subprocess.run([sys.executable, __file__, "measure", *ACCURACY_RUNS[name]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["live"] == pytest.approx(r["planned_arguments"], rel=0.01), r  # the arguments are exact
    assert r["measured"] == pytest.approx(r["planned"], rel=0.20), r


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _measure(gin_args: list[str]) -> dict:
    import jax
    import numpy as np

    from jaxpost import config, models
    from jaxpost.algorithms import make_sft_loss
    from jaxpost.models.config import ModelConfig
    from jaxpost.models.load import load_model
    from jaxpost.plan.core import plan_current
    from jaxpost.plan.methods import recipe_arg
    from jaxpost.recipes.sft import sft
    from jaxpost.sharding import Partitioner
    from jaxpost.train.optimizer import make_optimizer
    from jaxpost.train.state import abstract_state, init_sharded_state, state_shardings
    from jaxpost.train.step import batch_shardings, compile_train_step, make_train_step

    files, bindings, _ = config.split_gin_args(gin_args)
    config.parse(files, bindings, finalize=False)
    planned = plan_current(1)
    seq_len, batch_size = recipe_arg(sft, "seq_len"), recipe_arg(sft, "batch_size")
    part = Partitioner()
    with part.activate():
        cfg, graphdef, params = load_model(ModelConfig(), None, part)
        shardings_p = part.shardings(models.logical_axes(cfg), params)
        optimizer = make_optimizer(total_steps=1000)
        shardings = state_shardings(abstract_state(params, optimizer), shardings_p, part, optimizer)
        state = init_sharded_state(params, optimizer, shardings)
        del params
        rng = np.random.default_rng(0)
        host = {"tokens": rng.integers(0, cfg.vocab_size, (batch_size, seq_len), dtype=np.int32),
                "positions": np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1)),
                "segment_ids": np.ones((batch_size, seq_len), np.int32),
                "targets": rng.integers(0, cfg.vocab_size, (batch_size, seq_len), dtype=np.int32),
                "loss_mask": np.ones((batch_size, seq_len), np.float32)}
        b_sh = batch_shardings(host, part)
        batch = jax.device_put(host, b_sh)
        step = compile_train_step(make_train_step(make_sft_loss(graphdef, cfg, recipe_arg(sft, "chunk_size")),
                                                  optimizer), shardings, b_sh, None)
        state, metrics = step(state, batch, None)  # warm-up: compile, first-run allocations, thread pools
        jax.block_until_ready((state, metrics))
        del metrics
        gc.collect()
        live = sum(x.nbytes for x in jax.live_arrays())
        rss = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        state, metrics = step(state, batch, None)
        jax.block_until_ready((state, metrics))
        growth = _status("VmHWM") - rss
    return {"planned": planned.step_peak, "planned_arguments": planned.step_arguments,
            "planned_temp": planned.step_temp, "live": live, "growth": growth, "measured": live + growth,
            "loss": float(metrics["loss"])}


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "measure":
    print(json.dumps(_measure(sys.argv[2:])))
