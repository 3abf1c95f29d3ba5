"""The training loop: one explicit function, `train(TrainConfig)`, used by train_lora.py and the miniature.

Dtype policy (the one place it is stated): the frozen base model runs in bf16 on GPUs that support it and in
fp32 on CPU (or as --dtype says; weights.resolve_dtype); LoRA parameters, their gradients and AdamW's state are
always fp32, and LoRALinear casts A and B to the activations' dtype in forward (lora.py); merging computes B A in
fp32 and rounds once. Logits are cast to fp32 for the loss. Full-parameter training (pretraining the miniature)
keeps the whole model in fp32.

A step: the global batch (--batch-size examples) is split into micro-batches of --micro-batch-size, spread
over the ranks (torchrun) and accumulated. The loss is summed over answer tokens and divided by the answer
tokens of the whole global batch, so any split of the same batch gives the same gradient. Within a micro-batch
the prompt's head, the same in every row, is computed once (share_prefix; minicalm.loss, CalmForCausalLM).

Stages, top to bottom: `setup` (data, plan, model, optimizer, resume) -> the loop in `train` -> `train_step`
(one optimizer step) and `save` (the checkpoint); `validate` between steps.
"""
from __future__ import annotations

import json
import math
import os
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from . import data
from .adapter import save_adapter
from .config import POST_MODEL, CalmConfig
from .evaluate import evaluate_rows
from .files import atomic_write, read_records, write_json, write_text
from .lora import apply_lora
from .nf4 import trainable_parameters
from .variants import check_init, loraplus_groups
from .loss import answer_loss, micro_step, shared_prefix_len
from .model import eval_mode
from .plan import preflight
from .progress import Progress, fmt_time
from .task import Task, load_task
from .tokenizer import load_tokenizer
from .weights import load_model, resolve, resolve_dtype, save_checkpoint


@dataclass
class TrainConfig:
    model: str = POST_MODEL                  # hub id or local checkpoint folder
    revision: str | None = None              # hub branch, tag or commit; recorded in the adapter
    task: str = "marc-ja"                    # built-in task name or a task JSON file (minicalm.task)
    train_file: str | None = None            # the task's JSON lines; None: its train split from the hub
    valid_file: str | None = None            # None: the task's validation split from the hub ("none" to skip)
    out: str = "runs/open-calm-7b-lora"
    epochs: float = 3.0
    lr: float = 3e-4
    batch_size: int = 64                     # examples per optimizer step, all ranks together
    micro_batch_size: int = 16               # examples per forward/backward on one rank
    max_len: int = 256                       # tokens per example; a row's text is truncated to fit
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("query_key_value",)
    use_dora: bool = False                   # LoRA's variants (variants.py): DoRA's learned row magnitudes,
    use_rslora: bool = False                 # rsLoRA's alpha / sqrt(r),
    lora_init: str = "default"               # A and B from: default, gaussian, pissa, pissa_niter_K, olora,
    loraplus_lr_ratio: float | None = None   # LoRA+: B's learning rate is lr x this
    quantize: str | None = None              # "nf4": the base's block weights in 4 bits (QLoRA; nf4.py)
    warmup_steps: int = 100
    schedule: str = "cosine"                 # decay after warmup: cosine or linear, to zero
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 500                    # steps between validation losses (0: only at the end)
    eval_limit: int = 500                    # validation rows for the loss
    eval_accuracy: int = 0                   # validation rows for greedy-answer accuracy (0: off)
    save_every: int = 500
    max_steps: int | None = None             # stop after this many steps (overrides epochs)
    limit_train: int | None = None           # use only the first N training examples
    seed: int = 1337
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "auto"                      # auto: bf16 on a capable GPU, fp32 on CPU
    resume: bool = False
    train_on_inputs: bool = False            # loss over the whole prompt (the post's way), not the answer only
    grad_checkpoint: bool = False
    share_prefix: bool = True                # compute the rows' common prompt head once per micro-batch
    compile: bool = False                    # torch.compile each block (for GPU runs)
    full: bool = False                       # train every parameter instead of LoRA (pretraining)
    text: bool = False                       # raw-text language modelling (packed blocks of max_len), no prompt
    max_time: float | None = None            # seconds; stop and save once exceeded
    log: bool = True                         # progress bar and messages on stderr

    def __post_init__(self):
        self.lora_targets = tuple(self.lora_targets)


# Settings a resumed run must share with the checkpoint: they decide the data order, the adapter or the schedule's
# shape. Paths may change (a moved model or data file); so may --epochs / --max-steps, to extend or cut a run.
RESUME_FIXED = ("task", "lr", "batch_size", "max_len", "lora_r", "lora_alpha", "lora_targets", "use_dora",
                "use_rslora", "lora_init", "loraplus_lr_ratio", "quantize", "warmup_steps",
                "schedule", "limit_train", "seed", "train_on_inputs", "full", "text")


# ----------------------------------------------------------------------------- small pieces

def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine or linear decay to zero at `total`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (0.5 * (1 + math.cos(math.pi * frac)) if cfg.schedule == "cosine" else 1 - frac)


def peak_memory(device: torch.device) -> int:
    """Peak bytes: accelerator memory allocated on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024   # bytes on macOS, KiB on Linux


def say(cfg: TrainConfig, rank: int, *msg) -> None:
    if cfg.log and rank == 0:
        print(*msg, file=sys.stderr, flush=True)


def split_path(cfg: TrainConfig, task: Task, split: str):
    """--train-file / --valid-file, or the task's own split from the hub."""
    given, flag = (cfg.train_file, "--train-file") if split == "train" else (cfg.valid_file, "--valid-file")
    return given or data.task_data(task, split, instead=flag)


def load_examples(cfg: TrainConfig, tok, task: Task, split: str, limit: int | None) -> list[data.Example]:
    """Prompt examples (or packed raw-text blocks with --text) of one split."""
    path = split_path(cfg, task, split)
    rows = data.read_jsonl(path, task, limit=limit)
    if cfg.text:
        blocks = data.pack_texts(tok, [r.text for r in rows], cfg.max_len)
        return [data.Example(b.tolist(), b.tolist()) for b in blocks]
    examples, truncated = data.encode_rows(data.PromptEncoder(tok, cfg.max_len, task), rows, cfg.train_on_inputs)
    if truncated:
        print(f"{path}: {truncated} of {len(rows)} rows truncated to --max-len {cfg.max_len}", file=sys.stderr)
    return examples


def common_prefix(examples: list[data.Example]) -> int:
    """Tokens every example begins with (the prompt's head): what sharing saves, for the plan."""
    first = examples[0].input_ids
    n = len(first)
    for e in examples[1:]:
        while e.input_ids[:n] != first[:n]:
            n -= 1
    return n


def batch_tensors(examples: list[data.Example], pad_id: int, share: bool, device):
    """(input_ids, labels, shared prefix length) of one micro-batch, on the device."""
    x, y = data.collate(examples, pad_id)
    return x.to(device), y.to(device), shared_prefix_len(x) if share else 0


@torch.no_grad()
def validation_loss(model, examples: list[data.Example], micro_batch_size: int, pad_id: int, device,
                    share: bool = True) -> float:
    """The loss per scored token over the examples, in eval mode (no dropout)."""
    total = 0.0
    with eval_mode(model):
        for idx in data.length_batches([len(e.input_ids) for e in examples], micro_batch_size, seed=0):
            x, y, shared = batch_tensors([examples[i] for i in idx], pad_id, share, device)
            total += answer_loss(model, x, y, shared).item()
    return total / max(sum(e.n_scored for e in examples), 1)


def validation_accuracy(model, tok, rows: list[data.Row], task: Task, cfg: TrainConfig) -> float:
    """Greedy-answer accuracy on a slice of the validation rows (the evaluation code path)."""
    return evaluate_rows(model, tok, rows, task, max_len=cfg.max_len, batch_size=cfg.micro_batch_size,
                         log=False)["metrics"]["accuracy"]


# ----------------------------------------------------------------------------- set-up

@dataclass
class LossScale:
    """fp16's dynamic loss scale, for GPUs without bf16 (T4, V100), as torch.amp.GradScaler keeps it: the loss is
    multiplied by `value` before backward, so that small gradients do not flush to zero in fp16 activations; a step
    whose gradients overflow is skipped and the scale halved; after `interval` good steps in a row it doubles."""
    value: float = 2.0 ** 16
    good_steps: int = 0
    interval: int = 2000


@dataclass
class Run:
    """Everything `setup` prepares and the loop uses."""
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    out: Path
    tok: object
    task: Task
    train_set: list[data.Example]
    valid_set: list[data.Example]
    accuracy_set: list[data.Row]      # read once, answered at every validation
    steps_per_epoch: int
    total_steps: int
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    step: int = 0
    epoch_batches: tuple[int, list[list[int]]] = (-1, [])   # (epoch, its global batches), drawn once an epoch
    loss_scale: LossScale | None = None                     # fp16 training's (--dtype float16)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.opt.param_groups for p in g["params"]]

    @property
    def state_file(self) -> Path:
        return self.out / "state.pt"


def setup(cfg: TrainConfig) -> Run:
    """Check the settings, read the data (bad files fail before a 7B model is loaded), print the plan, load the
    model with LoRA (or every parameter trainable), make the optimizer, and restore a checkpoint on --resume."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    check_settings(cfg, world)
    device = torch.device(cfg.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dtype = torch.float32 if cfg.full else resolve_dtype(cfg.dtype, device)

    task = load_task(cfg.task)
    tok = load_tokenizer(cfg.model, revision=cfg.revision)
    train_set = load_examples(cfg, tok, task, "train", cfg.limit_train)
    valid_set = [] if cfg.valid_file == "none" else load_examples(cfg, tok, task, "validation", cfg.eval_limit)
    accuracy_set = (data.read_jsonl(split_path(cfg, task, "validation"), task, limit=cfg.eval_accuracy)
                    if valid_set and cfg.eval_accuracy else [])
    if not train_set:
        raise ValueError("the training set is empty")
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))
    if cfg.warmup_steps >= total_steps:
        say(cfg, rank, f"warning: --warmup-steps {cfg.warmup_steps} >= the run's {total_steps} steps: the learning "
                       f"rate never reaches --lr {cfg.lr}")

    folder = resolve(cfg.model, cfg.revision)   # once: the hub is asked once, the plan and the load share it
    if rank == 0:   # memory and time estimate from the real step on fake tensors; refuses what will not fit
        shared = common_prefix(train_set) if cfg.share_prefix else 0
        preflight(cfg, CalmConfig.from_json(folder / "config.json"), [len(e.input_ids) for e in train_set], device,
                  dtype, shared=shared, log=cfg.log)
    model = trainable_model(cfg, folder, dtype, device)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = (loraplus_groups(model, cfg.lr, cfg.loraplus_lr_ratio, cfg.weight_decay) if cfg.loraplus_lr_ratio
              else params)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    trainable, total = trainable_parameters(model)
    say(cfg, rank, f"model {cfg.model}: {total:,} parameters, {trainable:,} trainable; {len(train_set):,} examples, "
                   f"{total_steps:,} steps of {cfg.batch_size}, {world} process(es), {dtype}")
    run = Run(cfg, rank, world, device, Path(cfg.out), tok, task, train_set, valid_set, accuracy_set,
              steps_per_epoch, total_steps, model, opt, loss_scale=LossScale() if dtype == torch.float16 else None)
    if cfg.resume:
        resume(run)
    if rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
        write_json(run.out / "train_config.json", asdict(cfg))
        write_json(run.out / "task.json", task.to_dict())
        keep_metrics_until(run.out / "metrics.jsonl", run.step)
    return run


def check_settings(cfg: TrainConfig, world: int) -> None:
    """Refuse, before anything is read or loaded, settings that cannot run: a batch that does not split into the
    micro-batches of every process, a run folder that holds another run (without --resume), --resume without one."""
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by --micro-batch-size "
                         f"{cfg.micro_batch_size} x {world} processes")
    state_file = Path(cfg.out) / "state.pt"
    if state_file.exists() and not cfg.resume:
        raise FileExistsError(f"{cfg.out} already holds a run's checkpoint ({state_file}); pass --resume to continue "
                              f"it or choose another --out")
    if cfg.resume and not state_file.exists():
        raise FileNotFoundError(f"--resume: no checkpoint in {cfg.out} (expected {state_file})")
    if cfg.full and cfg.quantize:
        raise ValueError("--quantize nf4 freezes the base in 4 bits: it trains LoRA, not every parameter (--full)")
    if not cfg.full:
        check_init(cfg.lora_init, cfg.use_dora, quantized=bool(cfg.quantize))
    if cfg.loraplus_lr_ratio is not None and cfg.loraplus_lr_ratio <= 0:
        raise ValueError(f"--loraplus-lr-ratio must be positive (B's learning rate is lr x it), not "
                         f"{cfg.loraplus_lr_ratio}")


def trainable_model(cfg: TrainConfig, folder: Path, dtype: torch.dtype, device: torch.device):
    """The base model with LoRA (or, with --full, every parameter trainable), in train mode."""
    torch.manual_seed(cfg.seed)   # LoRA's A is drawn here
    model = load_model(folder, dtype=dtype, device=device, quantize=cfg.quantize)
    if cfg.full:
        model.requires_grad_(True)
    else:
        apply_lora(model, cfg.lora_targets, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                   use_dora=cfg.use_dora, use_rslora=cfg.use_rslora, init_lora_weights=cfg.lora_init)
    model.grad_checkpoint = cfg.grad_checkpoint
    if cfg.compile:   # each block on its own: shapes change with every micro-batch, so compile them dynamic
        for block in model.gpt_neox.layers:
            block.compile(dynamic=True)
    return model.train()


def resume(run: Run) -> None:
    """Restore the adapter (or model), AdamW's state and the step; refuse settings that would change the run."""
    state = torch.load(run.state_file, map_location="cpu", weights_only=True)   # our own file, still no unpickling
    same = lambda a, b: (list(a) if isinstance(a, tuple) else a) == (list(b) if isinstance(b, tuple) else b)
    changed = {k: (state["config"].get(k), v) for k, v in asdict(run.cfg).items()
               if k in RESUME_FIXED and not same(state["config"].get(k), v)}
    if changed:
        raise ValueError(f"--resume: {run.state_file} was trained with other settings: " +
                         ", ".join(f"{k} {a!r} now {b!r}" for k, (a, b) in changed.items()))
    run.model.load_state_dict(state["trainable"], strict=False)
    run.opt.load_state_dict(state["optimizer"])
    run.step = state["step"]
    if run.loss_scale is not None and "loss_scale" in state:
        run.loss_scale = LossScale(**state["loss_scale"])
    say(run.cfg, run.rank, f"resumed from {run.state_file} at step {run.step}")


# ----------------------------------------------------------------------------- one step, a checkpoint

def step_batch(run: Run, step: int) -> list[int]:
    """The example indices of the global batch of `step`: a function of (seed, epoch) and the step only.
    Drawn whole, then cut: --micro-batch-size and the process count change how a step is computed, never which
    examples it sees (length_batches sorts a batch by length: little padding)."""
    epoch, i = divmod(step, run.steps_per_epoch)
    if run.epoch_batches[0] != epoch:
        run.epoch_batches = (epoch, data.length_batches([len(e.input_ids) for e in run.train_set], run.cfg.batch_size,
                                                        seed=run.cfg.seed + epoch))
    return run.epoch_batches[1][i]


def train_step(run: Run, batch: list[int] | None = None) -> dict:
    """One optimizer step on the global batch (example indices; default: this step's, step_batch): this rank's
    micro-batches (forward, backward, accumulate), the all-reduce across ranks, gradient clipping and AdamW.
    Returns the step's metrics."""
    cfg, model, opt, device = run.cfg, run.model, run.opt, run.device
    batch = step_batch(run, run.step) if batch is None else batch
    mine = [batch[k:k + cfg.micro_batch_size] for k in range(0, len(batch), cfg.micro_batch_size)][run.rank::run.world]
    n_target = sum(run.train_set[j].n_scored for j in batch)
    lr = lr_at(run.step, run.total_steps, cfg)
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_ratio", 1.0)   # LoRA+'s B group keeps its ratio to the schedule
    # Data order and dropout RNG are functions of (seed, step, rank): resuming needs only the step.
    torch.manual_seed(cfg.seed * 1_000_003 + run.step * run.world + run.rank)
    t0 = time.time()
    loss_sum, tokens = torch.zeros((), device=device), torch.zeros((), device=device)
    for idx in mine:
        x, y, shared = batch_tensors([run.train_set[j] for j in idx], run.tok.pad_token_id, cfg.share_prefix, device)
        loss_sum += micro_step(model, x, y, n_target / (run.loss_scale.value if run.loss_scale else 1), shared)
        tokens += sum(len(run.train_set[j].input_ids) for j in idx)
    if run.world > 1:   # DDP over the trainable (adapter) gradients, by hand
        for p in run.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
        dist.all_reduce(loss_sum)
        dist.all_reduce(tokens)
    loss = loss_sum.item() / n_target
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss} at step {run.step + 1}; the last good checkpoint "
                                 f"is kept in {run.out} (try a lower --lr)")
    grad_norm = apply_gradients(run)
    run.step += 1
    rec = {"step": run.step, "epoch": round(run.step / run.steps_per_epoch, 4), "loss": loss, "lr": lr,
           "tokens_per_s": round(tokens.item() / max(time.time() - t0, 1e-9), 1),
           "peak_memory_bytes": peak_memory(device), "grad_norm": None if grad_norm is None else round(grad_norm, 4)}
    return rec | ({"loss_scale": run.loss_scale.value, "skipped": grad_norm is None} if run.loss_scale else {})


def apply_gradients(run: Run) -> float | None:
    """Unscale (fp16), clip and take the AdamW step; the gradient norm before clipping, or None for an fp16 step
    skipped because its gradients overflowed (the loss scale is halved)."""
    scale = run.loss_scale
    for p in run.params if scale is not None else []:   # unscale; no sync with the GPU here
        if p.grad is not None:
            p.grad.div_(scale.value)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, run.cfg.grad_clip or math.inf)
    if scale is not None:   # an overflow shows as a non-finite norm: skip the step
        if not torch.isfinite(grad_norm):
            run.opt.zero_grad(set_to_none=True)
            scale.value, scale.good_steps = scale.value / 2, 0
            return None
        scale.good_steps += 1
        if scale.good_steps % scale.interval == 0:
            scale.value *= 2
    if not torch.isfinite(grad_norm):
        raise FloatingPointError(f"non-finite gradient norm at step {run.step + 1}; the last good checkpoint "
                                 f"is kept in {run.out} (try a lower --lr)")
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    return grad_norm.item()


def save(run: Run, final: bool = False) -> None:
    """Checkpoint (rank 0): state.pt (trainable tensors, AdamW, step, settings) and the adapter (or the model),
    each written atomically, so a kill at any moment leaves the previous checkpoint whole."""
    if run.rank != 0:
        return
    cfg, model = run.cfg, run.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {"step": run.step, "trainable": {k: v for k, v in model.state_dict().items() if k in trainable},
             "optimizer": run.opt.state_dict(), "config": asdict(cfg)}
    if run.loss_scale is not None:
        state["loss_scale"] = asdict(run.loss_scale)
    atomic_write(run.state_file, lambda p: torch.save(state, p))
    folder = (save_checkpoint(model, run.out / "model", tokenizer_dir=run.tok.path.parent) if cfg.full
              else save_adapter(model, run.out / "adapter", cfg.model, cfg.revision))
    # the task beside the weights: eval.py --adapter (or --model RUN/model) then asks the same question by default
    write_json(folder / "task.json", run.task.to_dict())
    say(cfg, run.rank, f"\nsaved step {run.step} to {run.out}" + (" (final)" if final else ""))


def validate(run: Run, rec: dict) -> None:
    """Validation loss (and greedy accuracy with --eval-accuracy) into the step's record."""
    cfg = run.cfg
    rec["val_loss"] = validation_loss(run.model, run.valid_set, cfg.micro_batch_size, run.tok.pad_token_id,
                                      run.device, cfg.share_prefix)
    if run.accuracy_set:
        rec["val_accuracy"] = validation_accuracy(run.model, run.tok, run.accuracy_set, run.task, cfg)


# ----------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, on_step: Callable[[Run, dict], None] | None = None) -> dict:
    """Fine-tune (LoRA, or every parameter with cfg.full) and write everything under cfg.out. Returns a summary.
    on_step(run, record), if given, sees the model after every optimizer step (experiments record what moved)."""
    run = setup(cfg)
    stop = {"signal": None}   # set by Ctrl-C, SIGTERM (schedulers, torchrun) or --max-time; acted on between steps
    handlers = {sig: signal.signal(sig, lambda n, _: stop.update(signal=signal.Signals(n).name))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    bar = Progress(run.total_steps, "train", start=run.step, enabled=cfg.log and run.rank == 0)
    t_start, rec, val = time.time(), {"loss": float("nan")}, None
    try:
        while run.step < run.total_steps and stop["signal"] is None:
            rec = train_step(run)
            rec["elapsed_s"] = round(time.time() - t_start, 2)
            if on_step is not None:
                on_step(run, rec)
            if run.valid_set and (run.step == run.total_steps or (cfg.eval_every and run.step % cfg.eval_every == 0)):
                validate(run, rec)
                val = rec["val_loss"]
            if run.rank == 0:
                with open(run.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
            bar.update(1, loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if cfg.max_time and time.time() - t_start > cfg.max_time:
                stop["signal"] = "max_time"
            if run.world > 1:   # every rank stops at the same step, or one would wait forever in all_reduce
                flag = torch.tensor(float(stop["signal"] is not None), device=run.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                if flag.item() and stop["signal"] is None:
                    stop["signal"] = "another rank"
            if (cfg.save_every and run.step % cfg.save_every == 0) or run.step == run.total_steps or stop["signal"]:
                save(run, final=run.step == run.total_steps)
        if run.world > 1:
            leave_process_group()
    finally:
        bar.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if run.world > 1 and dist.is_initialized():   # after an error: no collective, the other rank may be gone
            dist.destroy_process_group()
    if stop["signal"] and run.step < run.total_steps:
        say(cfg, run.rank, f"stopped ({stop['signal']}): checkpoint at step {run.step} in {run.out}; continue with "
                           f"--resume")
    else:
        say(cfg, run.rank, f"done: {run.step} steps in {fmt_time(time.time() - t_start)}, last loss {rec['loss']:.4f}"
                           + (f", validation loss {val:.4f}" if val is not None else "") + f"; checkpoint in {run.out}")
    return {"step": run.step, "total_steps": run.total_steps, "loss": rec["loss"], "val_loss": val,
            "out": str(run.out), "model": run.model, "seconds": time.time() - t_start}


def leave_process_group(timeout: float = 10.0) -> None:
    """Leave torchrun's process group once every rank is done (rank 0 may still be saving).

    A gloo worker thread drops its references to a collective's tensors just after the collective returns, and it
    needs the GIL for that; if the interpreter is already exiting the process aborts ('terminate called without an
    active exception'). So: one last collective, then wait (GIL released) until its tensor is ours alone again.
    """
    done = torch.zeros(1)
    dist.all_reduce(done)
    deadline = time.time() + timeout
    while dist.get_backend() == "gloo" and done._use_count() > 1 and time.time() < deadline:
        time.sleep(0.001)
    dist.destroy_process_group()


def keep_metrics_until(path: Path, step: int) -> None:
    """On resume drop metric lines after the checkpoint's step (those steps run again) and any torn line."""
    if path.exists():
        kept = [r for r in read_records(path) if isinstance(r.get("step"), int) and r["step"] <= step]
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
