"""The training loop, `train(TrainConfig)`, top to bottom: the settings, setup (data, model, LoRA, optimizer), one
step, the loop, saving. train_lora.py and the miniature call it.

Dtype policy (stated here once; config.resolve_dtype picks the base's dtype): the frozen base runs in bf16 on GPUs
that support it and in fp32 on CPU (or as `dtype` says); LoRA's parameters, their gradients and AdamW's state are
always fp32 (LoRALinear casts A and B to the activations' dtype in forward); merging computes s B A in fp32 and rounds
once; logits are cast to fp32 for the loss; fp16 scales the loss (torch's GradScaler). Full training is all fp32.

A step: the global batch (batch_size examples) is cut into micro-batches, spread over the processes (torchrun) and
accumulated; the loss is summed over the scored tokens and divided by those of the whole global batch, so any split
gives the same gradient; each micro-batch computes its shared prompt prefix once (loss.py). The processes sum their
gradients with one all-reduce per step of all of them flattened into one buffer: not DistributedDataParallel, as
the adapters' gradients are small (4M numbers for OpenCALM-7B at r 8) so overlapping their sync with backward buys
nothing, DDP would broadcast the frozen 7B weights at start, and its hooks follow the wrapped forward while the
shared-prefix pass calls the model's pieces twice per micro-batch. The machinery this file calls (data, files,
evaluation, the plan, the run's bookkeeping) is imported in one block, below the lesson's own modules.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .config import SettingError, TrainConfig, check_positions, resolve_dtype
from .lora import apply_lora, trainable_parameters
from .loss import answer_loss, shared_prefix_len, validation_loss
from .variants import loraplus_groups
# ---- the border: the machinery this file calls to read, load, save and keep the run's books
from .io.adapter import save_adapter
from .io.files import write_json
from .io.tokenizer import Tokenizer, load_tokenizer
from .io.weights import fingerprint, load_model, model_config, resolve, save_checkpoint
from .tasks.data import Example, collate, length_batches, loss_batches, run_data
from .tasks.task import Task, load_task
from .tools.evaluate import evaluate_rows
from .tools.plan import preflight
from .tools.run import Processes, RunFolder, StopSignals, data_digest, fmt_time, peak_memory, processes, say
from tqdm import tqdm


@dataclass
class Run:
    """What setup prepares and the loop uses; `step` is what the loop moves (and torch the tensors)."""
    cfg: TrainConfig
    proc: Processes
    folder: RunFolder
    tok: Tokenizer
    task: Task
    train_set: list[Example]
    valid_set: list[Example]
    accuracy_rows: list                     # validation rows answered greedily at each validation
    steps_per_epoch: int
    total_steps: int
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler            # enabled for fp16 only
    step: int = 0
    order: dict = field(default_factory=dict)   # {epoch: its global batches}, drawn once an epoch
    digest: str = ""                        # the training examples' fingerprint, saved in state.pt
    base: str = ""                          # the base checkpoint's (io.weights.fingerprint): a moved base resumes

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.opt.param_groups for p in g["params"]]


# ----------------------------------------------------------------------------- setup

def setup(cfg: TrainConfig, proc: Processes) -> Run:
    """Read the data (bad files fail before a 7B model is loaded), print the plan, load the model with LoRA (or every
    parameter trainable), make the optimizer and its schedule, and restore the checkpoint with cfg.resume."""
    if cfg.batch_size % (cfg.micro_batch_size * proc.world):
        raise SettingError("TrainConfig", "batch_size", f"{cfg.batch_size} must be divisible by micro_batch_size "
                                                        f"{cfg.micro_batch_size} x {proc.world} processes")
    folder = RunFolder(cfg.out)
    folder.check(cfg.resume)
    state = folder.load_state(cfg) if cfg.resume else None
    task, tok = load_task(cfg.task), load_tokenizer(cfg.model, revision=cfg.revision)
    model_cfg = model_config(cfg.model, cfg.revision)
    check_positions(model_cfg, cfg.max_len, ("TrainConfig", "max_len"), "", f"an example must fit the model "
                    f"{cfg.model}: lower it to {model_cfg.max_position_embeddings} or less")
    train_set, valid_set, accuracy_rows = run_data(cfg, task, tok)
    digest = data_digest(train_set)   # once: saved with every checkpoint, and a resume must match it
    if state is not None:
        folder.check_data(state, digest)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))

    device, dtype = proc.device, torch.float32 if cfg.full else resolve_dtype(cfg.dtype, proc.device)
    checkpoint = resolve(cfg.model, cfg.revision)   # the plan and the load share one download
    if proc.rank == 0:   # memory and time from the real step on fake tensors; refuses what will not fit
        lengths = [len(e.input_ids) for e in train_set]
        preflight(cfg, model_cfg, lengths, device, dtype,
                  shared=shared_prefix_len([e.input_ids for e in train_set]) if cfg.share_prefix else 0)
    model = trainable_model(cfg, checkpoint, dtype, device)
    groups = ([p for p in model.parameters() if p.requires_grad] if cfg.loraplus_lr_ratio is None else
              loraplus_groups(model, cfg.lr, cfg.loraplus_lr_ratio, cfg.weight_decay))
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step = 0 if state is None else restore(state, model, opt, scaler)
    # the learning rate, a function of the step (so that resuming needs only the step): each group's initial lr
    # times lr_factor, so that LoRA+'s groups keep their ratio
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, cfg), last_epoch=step - 1)
    loud, (trainable, total) = cfg.log and proc.rank == 0, trainable_parameters(model)
    say(loud and state is not None, f"resumed from {folder.state_file} at step {step}")
    say(loud, f"model {cfg.model}: {total:,} parameters, {trainable:,} trainable; {len(train_set):,} examples, "
              f"{total_steps:,} steps of {cfg.batch_size}, {proc.world} process(es), {dtype}")
    say(loud and total_steps <= cfg.warmup_steps, f"warning: warmup_steps {cfg.warmup_steps} >= the run's "
                                                  f"{total_steps} steps: the learning rate never reaches lr {cfg.lr}")
    if proc.rank == 0:
        folder.start(cfg, task, step)
    return Run(cfg, proc, folder, tok, task, train_set, valid_set, accuracy_rows, steps_per_epoch, total_steps, model,
               opt, schedule, scaler, step, digest=digest, base=fingerprint(checkpoint))


def trainable_model(cfg: TrainConfig, checkpoint, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The base model with LoRA (or, with cfg.full, every parameter trainable), in train mode."""
    torch.manual_seed(cfg.seed)   # LoRA's A is drawn here
    model = load_model(checkpoint, dtype=dtype, device=device, quantize=cfg.quantize)
    if cfg.full:
        model.requires_grad_(True)
    else:
        apply_lora(model, cfg.lora)
    model.grad_checkpoint = cfg.grad_checkpoint
    if cfg.compile:   # each block on its own: shapes change with every micro-batch, so compile them dynamic
        for block in model.gpt_neox.layers:
            block.compile(dynamic=True)
    return model.train()


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """The learning rate at `step` over cfg.lr: linear warmup over warmup_steps, then cosine or linear decay to zero
    at `total`. A factor, so that LoRA+'s groups keep their ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * frac)) if cfg.schedule == "cosine" else 1 - frac


def restore(state: dict, model, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> int:
    """A checkpoint's trainable tensors, AdamW's state and the loss scale; its step."""
    model.load_state_dict(state["trainable"], strict=False)
    opt.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    return state["step"]


# ----------------------------------------------------------------------------- one step

def global_batch(run: Run, step: int) -> list[int]:
    """The example indices of `step`'s global batch, a function of (seed, epoch) and the step only: drawn whole, then
    cut, so micro_batch_size and the process count change how a step is computed, never which examples it sees
    (length_batches groups similar lengths: little padding)."""
    epoch, i = divmod(step, run.steps_per_epoch)
    if epoch not in run.order:
        run.order = {epoch: length_batches([len(e.input_ids) for e in run.train_set], run.cfg.batch_size,
                                           seed=run.cfg.seed + epoch)}
    return run.order[epoch][i]


def train_step(run: Run, batch: list[int]) -> dict:
    """One optimizer step on a global batch (example indices): this process's micro-batches (forward, backward,
    accumulate), the gradients summed over the processes, unscaling (fp16), clipping, AdamW. The step's metrics."""
    cfg, model, device, proc = run.cfg, run.model, run.proc.device, run.proc
    micro = [batch[k:k + cfg.micro_batch_size] for k in range(0, len(batch), cfg.micro_batch_size)]
    n_target = sum(run.train_set[j].n_scored for j in batch)   # the global batch's scored tokens
    torch.manual_seed(cfg.seed * 1_000_003 + run.step * proc.world + proc.rank)   # dropout: a function of the step
    t0, loss_sum, tokens = time.time(), torch.zeros((), device=device), 0
    for idx in micro[proc.rank::proc.world]:
        rows = [run.train_set[j] for j in idx]
        x, y = (t.to(device) for t in collate(rows, run.tok.pad_token_id))
        P = shared_prefix_len([e.input_ids for e in rows]) if cfg.share_prefix else 0   # the rows' common start
        loss = answer_loss(model, x, y, prefix=P)
        run.scaler.scale(loss / n_target).backward()
        loss_sum += loss.detach()
        tokens += x.numel()
    if proc.world > 1:   # one all-reduce: every gradient, flattened, then the loss and the tokens
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in run.params]
        flat = proc.all_reduce(torch.cat([*(g.flatten() for g in grads), loss_sum[None],
                                          torch.tensor([float(tokens)], device=device)]))
        for p, g in zip(run.params, flat[:-2].split([p.numel() for p in run.params])):
            p.grad = g.view_as(p)
        loss_sum, tokens = flat[-2], int(flat[-1])
    loss = loss_sum.item() / n_target
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss} at step {run.step + 1}{run.folder.kept()} (try a lower lr)")
    lr, scale = run.schedule.get_last_lr()[0], run.scaler.get_scale()
    run.scaler.unscale_(run.opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip or math.inf)
    if not run.scaler.is_enabled() and not torch.isfinite(grad_norm):
        raise FloatingPointError(f"non-finite gradient norm at step {run.step + 1}{run.folder.kept()} "
                                 f"(try a lower lr)")
    run.scaler.step(run.opt)   # fp16: skipped if a gradient overflowed (then the scale halves)
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    run.schedule.step()
    run.step += 1
    rec = {"step": run.step, "epoch": round(run.step / run.steps_per_epoch, 4), "loss": loss, "lr": lr,
           "tokens_per_s": round(tokens / max(time.time() - t0, 1e-9), 1), "peak_memory_bytes": peak_memory(device),
           "grad_norm": round(grad_norm.item(), 4) if torch.isfinite(grad_norm) else None}
    if run.scaler.is_enabled():   # a skipped step halved the scale
        rec |= {"loss_scale": run.scaler.get_scale(), "skipped": run.scaler.get_scale() < scale}
    return rec


def validate(run: Run) -> dict:
    """The validation loss, and evaluation's scores on the first eval_accuracy rows: accuracy (multiple choice: by
    likelihood), a free-form task's exact match and char F1, and Pearson's r for numbers."""
    cfg = run.cfg
    batches = loss_batches(run.valid_set, cfg.micro_batch_size, run.tok.pad_token_id, run.proc.device)
    rec = {"val_loss": validation_loss(run.model, batches, cfg.share_prefix)}
    if run.accuracy_rows:
        m = evaluate_rows(run.model, run.tok, run.accuracy_rows, run.task, max_len=cfg.max_len,
                          batch_size=cfg.micro_batch_size, log=False)["metrics"]
        rec |= {f"val_{k}": m[k] for k in ("accuracy", "exact_match", "char_f1", "pearson") if k in m}   # any kind
    return rec


# ----------------------------------------------------------------------------- the loop, and saving

def train(cfg: TrainConfig, on_step: Callable[[Run, dict], None] | None = None) -> dict:
    """Fine-tune (LoRA, or every parameter with cfg.full) and write everything under cfg.out. Returns a summary.
    on_step(run, record), if given, sees the model after every optimizer step (experiments record what moved)."""
    with processes(cfg.device) as proc, RunFolder(cfg.out).locked(proc.rank == 0), StopSignals() as stop:
        run, t0, rec, val = setup(cfg, proc), time.time(), None, None
        loud = cfg.log and proc.rank == 0
        with tqdm(total=run.total_steps, initial=run.step, desc="train", disable=not loud) as bar, \
                run.folder.full_disk():   # while saving or logging: says what is kept and how to go on
            while run.step < run.total_steps:
                rec = train_step(run, global_batch(run, run.step)) | {"elapsed_s": round(time.time() - t0, 2)}
                if on_step is not None:
                    on_step(run, rec)
                if run.valid_set and (run.step == run.total_steps or cfg.eval_every and run.step % cfg.eval_every == 0):
                    rec |= validate(run)
                    val = rec["val_loss"]
                if proc.rank == 0:
                    run.folder.log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
                bar.update()
                stopping = stop.agreed(proc, bool(cfg.max_time) and time.time() - t0 > cfg.max_time)
                if cfg.save_every and run.step % cfg.save_every == 0 or run.step == run.total_steps or stopping:
                    save(run)
                if stopping:
                    break
    if rec is None:
        say(loud, f"nothing to train: {cfg.out} is at step {run.step} of {run.total_steps} already (raise --epochs or "
                  f"--max-steps to train on)")
    elif stop.reason and run.step < run.total_steps:
        say(loud, f"stopped ({stop.reason}): checkpoint at step {run.step} in {cfg.out}; continue with --resume")
    else:
        say(loud, f"done: {run.step} steps in {fmt_time(time.time() - t0)}, last loss "
            f"{rec['loss']:.4f}" + (f", validation loss {val:.4f}" if val is not None else "") +
            f"; checkpoint in {cfg.out}")
    return {"step": run.step, "total_steps": run.total_steps, "loss": None if rec is None else rec["loss"],
            "val_loss": val, "out": cfg.out, "model": run.model, "seconds": time.time() - t0, "stopped": stop.reason}


def save(run: Run) -> None:
    """Checkpoint (rank 0): state.pt (the trainable tensors, AdamW, the loss scale, the step and the settings) and the
    adapter (or the whole model), each written atomically, so a kill at any moment leaves the previous one whole."""
    if run.proc.rank != 0:
        return
    cfg, model = run.cfg, run.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    run.folder.save_state({"step": run.step, "config": asdict(cfg), "optimizer": run.opt.state_dict(),
                           "data": run.digest, "base": run.base,
                           "scaler": run.scaler.state_dict(),
                           "trainable": {k: v for k, v in model.state_dict().items() if k in trainable}})
    out = (save_checkpoint(model, run.folder.path / "model", tokenizer_dir=run.tok.path.parent) if cfg.full
           else save_adapter(model, run.folder.path / "adapter", base=cfg.model, revision=cfg.revision))
    if not cfg.text:   # what it was tuned to answer: eval.py asks the same by default (pretraining tunes to none)
        write_json(out / "task.json", run.task.to_dict())
    say(cfg.log, f"\nsaved step {run.step} to {cfg.out}" + (" (final)" if run.step == run.total_steps else ""))
