"""`segppo rm train`: a segment-, token- or bandit-level reward model from preference pairs.

Reads top to bottom: prepare data → build models → DeepSpeed engine → for each optimizer step,
score chosen and rejected responses (mean RM value at segment ends, DESIGN.md §3.2) and take a
Bradley-Terry step → evaluate and checkpoint → save a Hugging Face folder with `segppo.json`.

Output folder:
    model/            the final reward model (safetensors + tokenizer + segppo.json)
    checkpoints/step-N/  the same, every `save_every` steps
    state/            DeepSpeed training state for `--resume` (optimizer, scheduler, RNG, position)
    metrics.jsonl     one row per step and per evaluation
    run_config.json   the resolved configuration
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from segppo.config import RMConfig
from segppo.data import (
    ChatFormat,
    EncodedPair,
    LayoutOptions,
    SkipReport,
    collate_preferences,
    encode_preferences,
    eval_split_name,
    load_splits,
    split_train_eval,
)
from segppo.data.collate import pair_tokens
from segppo.data.packing import pack_preferences, packed_scores, packs_in_one_row
from segppo.distributed import (
    DistInfo,
    all_reduce_sum,
    check_run_folder,
    frozen_on_device,
    full_state_dict,
    latest_state,
    launch,
    load_training_state,
    loading_config,
    rank_group,
    save_training_state,
    set_seed,
)
from segppo.io import as_recorded
from segppo.kernels import segment_rewards
from segppo.models import (
    SegppoMetadata,
    create_reward_model,
    disable_dropout,
    load_policy,
    load_tokenizer,
    save_reward_model,
)
from segppo.models.loading import same_model
from segppo.models.zero3 import keep_partitioned_loading
from segppo.optim import left_out_note, planned_steps, training_engine
from segppo.preflight import check_rm_train
from segppo.rm.loss import bradley_terry_loss
from segppo.rm.scoring import Segmentation, score_responses
from segppo.rm.segment_survey import SegmentSurvey, survey_segments
from segppo.state import check_resumed_options, zero_partitioned
from segppo.tracking import LiveProgress, Tracker, console, truncate_metrics, write_config

StepCallback = Callable[[int, dict], None]


@dataclass
class PreferenceData:
    train: list[EncodedPair]
    eval: list[EncodedPair]
    train_report: SkipReport
    eval_report: SkipReport
    eval_split: str | None  # the split evaluated on; None: rows held out of the training split


def prepare_preferences(cfg: RMConfig, tokenizer) -> PreferenceData:
    """Load, split, format and tokenize the preference data (the held-out part is never trained on)."""
    options = LayoutOptions(
        prompt_key=cfg.prompt_key, chosen_key=cfg.chosen_key, rejected_key=cfg.rejected_key, strict=cfg.strict
    )
    # The dataset's own eval split when it has one (or --eval-split names one), else a held-out fraction.
    splits = load_splits(cfg.dataset)
    eval_split = eval_split_name(splits, cfg.eval_split, cfg.split)
    train_rows, eval_rows = split_train_eval(
        splits,
        eval_split=cfg.eval_split,
        eval_fraction=cfg.eval_fraction,
        seed=cfg.seed,
        train_split=cfg.split,
    )
    if cfg.max_samples is not None:
        train_rows = train_rows.select(range(min(cfg.max_samples, len(train_rows))))
    encode = dict(
        tokenizer=tokenizer,
        layout_options=options,
        max_len=cfg.max_len,
        max_prompt_len=cfg.max_prompt_len,
        chat_template=cfg.chat_template,
        template_kwargs=cfg.chat_template_kwargs,
    )
    train, train_report = encode_preferences(train_rows, **encode)
    evaluation, eval_report = encode_preferences(eval_rows, **encode)
    return PreferenceData(train, evaluation, train_report, eval_report, eval_split)


def batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def evaluate_pairs(
    reward_model,
    segmenter,
    pairs: Sequence[EncodedPair],
    segmentation: Segmentation,
    *,
    micro_batch_size: int,
    pad_token_id: int,
    info: DistInfo,
    use_margin: bool = False,
) -> dict[str, float]:
    """Pairwise accuracy, loss and score/segment statistics over `pairs`, split across ranks."""
    fields = (
        "pairs",
        "correct",
        "loss",
        "chosen",
        "rejected",
        "responses",
        "segments",
        "segment_tokens",
        "length",
        "score",
        "score_sq",
    )
    sums = torch.zeros(len(fields), dtype=torch.float64, device=info.device)
    for chunk in batches(list(pairs[info.rank :: info.world_size]), micro_batch_size):
        batch = collate_preferences(chunk, pad_token_id).to(info.device)
        scored = score_responses(reward_model, segmenter, batch, segmentation)
        n = batch.num_pairs
        chosen, rejected = scored.scores[:n], scored.scores[n:]
        margin = batch.margin if use_margin else None
        ends = segment_rewards(
            scored.rm_values,
            scored.entropy,
            batch.response_mask,
            granularity=segmentation.granularity,
            threshold=segmentation.threshold,
            has_eos=batch.has_eos,
            distribute="end",
        )
        positions = torch.arange(1, ends.ends.shape[1] + 1, device=info.device)
        covered = (
            (ends.ends * positions).amax(-1) if ends.ends.shape[1] else torch.zeros(2 * n, device=info.device)
        )
        sums += torch.stack(
            [
                torch.tensor(float(n), device=info.device),
                (chosen > rejected).sum().float(),
                bradley_terry_loss(chosen, rejected, margin) * n,
                chosen.sum(),
                rejected.sum(),
                torch.tensor(2.0 * n, device=info.device),
                ends.num_segments.sum().float(),
                covered.sum().float(),
                batch.response_mask.sum().float(),
                scored.scores.sum(),
                scored.scores.pow(2).sum(),
            ]
        ).double()
    all_reduce_sum(sums)
    total = dict(zip(fields, sums.tolist(), strict=True))
    pairs_n, responses = max(total["pairs"], 1.0), max(total["responses"], 1.0)
    mean = total["score"] / responses
    return {
        "accuracy": total["correct"] / pairs_n,
        "loss": total["loss"] / pairs_n,
        "chosen_score": total["chosen"] / pairs_n,
        "rejected_score": total["rejected"] / pairs_n,
        "score_mean": mean,
        "score_std": math.sqrt(max(total["score_sq"] / responses - mean * mean, 0.0)),
        "segments_per_response": total["segments"] / responses,
        "segment_length": total["segment_tokens"] / max(total["segments"], 1.0),
        "response_length": total["length"] / responses,
        "num_pairs": int(total["pairs"]),
    }


def score_pairs(
    reward_model,
    segmenter,
    pairs: Sequence[EncodedPair],
    segmentation: Segmentation,
    pad_token_id: int,
    device: torch.device,
    packing: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores of the chosen and of the rejected responses `[B]`, and the pairs' margins `[B]`.

    Padded (`collate_preferences`), or with `packing` packed (`pack_preferences`: the 2B
    sequences laid end to end in rows of the padded width, kept apart by the attention mask, or
    in one row when a model runs flash attention, `packs_in_one_row`): the same numbers, with
    fewer padding tokens.
    """
    if packing:
        one_row = packs_in_one_row(reward_model, segmenter)
        batch = pack_preferences(pairs, pad_token_id, one_row=one_row).to(device)
        scores = packed_scores(reward_model, segmenter, batch, segmentation)
    else:
        batch = collate_preferences(pairs, pad_token_id).to(device)
        scores = score_responses(reward_model, segmenter, batch, segmentation).scores
    n = len(pairs)
    return scores[:n], scores[n:], batch.margin


# What a resumed run keeps: the backbone, the segmentation (measured once, read back on --resume),
# what picks and orders the rows (a step's batch is found from the step number), and the chat format
# they are rendered in (segppo.json records one for PPO and eval). The data itself may change: a run
# stopped by a bad row resumes on a repaired copy.
RESUMED_AS_STARTED = (
    "model", "eval_split", "eval_fraction", "seed", "max_samples", "batch_size", "granularity",
    "entropy_threshold", "segmenter", "chat_template", "chat_template_kwargs",
)  # fmt: skip


def train_reward_model(cfg: RMConfig, *, step_callback: StepCallback | None = None) -> Path:
    """Train on `cfg.nproc` local ranks (or the ranks of an outer launcher); returns the model folder."""
    check_rm_train(cfg)
    check_run_folder(cfg.output_dir, resume=cfg.resume)
    # A copy of the model (or segmenter) folder is the model: the state loads into it as into the
    # original, and it segments the same.
    check_resumed_options(cfg, RESUMED_AS_STARTED, same={"model": same_model, "segmenter": same_model})
    launch(_train, cfg, step_callback, nproc=cfg.nproc, log_dir=cfg.output_dir)
    return cfg.output_dir / "model"


def _train(cfg: RMConfig, step_callback: StepCallback | None) -> None:
    with rank_group() as info:
        _train_on_rank(cfg, info, step_callback)


def _train_on_rank(cfg: RMConfig, info: DistInfo, step_callback: StepCallback | None) -> None:

    set_seed(cfg.seed)
    out = cfg.output_dir
    needs_segmenter = cfg.resolved_granularity == "segment"

    # Data: identical on every rank; each rank then takes its own slice of every global batch.
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    data = prepare_preferences(cfg, tokenizer)
    if info.is_main:
        console.print(f"[bold]train[/] {data.train_report}\n[bold]eval[/]  {data.eval_report}")
    steps_per_epoch = len(data.train) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{cfg.dataset}: {len(data.train)} usable training pairs, fewer than one --batch-size "
            f"({cfg.batch_size})"
        )
    total_steps, note = planned_steps(steps_per_epoch, cfg.epochs, cfg.max_steps, "epoch")
    left_out = left_out_note(len(data.train), cfg.batch_size, "training pairs", "steps", "epoch")
    for line in (left_out, note):
        if line and info.is_main:
            console.print(line)
    grad_accum = cfg.grad_accum(info.world_size)

    # Models: the trained RM, and a frozen segmenter (by default a copy of the initial model); under
    # ZeRO-3 both are built partitioned, and transformers knows it for the whole run.
    built = loading_config(zero_stage=cfg.zero_stage, bf16=cfg.bf16)
    _zero3 = keep_partitioned_loading(built)  # noqa: F841  (held for the run)
    model = create_reward_model(
        cfg.model,
        trust_remote_code=cfg.trust_remote_code,
        gradient_checkpointing=cfg.gradient_checkpointing,
        ds_config=built,
    )
    disable_dropout(model)
    if cfg.lora_rank:
        from segppo.models.lora import apply_lora

        merge = cfg.lora_export == "merged"  # an adapter that cannot be merged fails now, not at the end
        model = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, merge=merge)
    segmenter = None
    if needs_segmenter:
        segmenter_name = cfg.segmenter or cfg.model
        segmenter = load_policy(
            segmenter_name,
            dtype="bf16" if cfg.bf16 else "fp32",
            trust_remote_code=cfg.trust_remote_code,
            ds_config=built,
        )
        vocab = segmenter.get_input_embeddings().num_embeddings
        if vocab < len(tokenizer):
            raise ValueError(
                f"segmenter {segmenter_name} has a vocabulary of {vocab} but the reward model's "
                f"tokenizer has {len(tokenizer)} tokens; they must share a tokenizer"
            )
        segmenter = frozen_on_device(segmenter, info, zero_stage=cfg.zero_stage, bf16=cfg.bf16)
    survey = _segment_survey(cfg, segmenter, data.train, tokenizer.pad_token_id, info)
    segmentation = survey.segmentation

    engine, scheduler = training_engine(
        model,
        lr=cfg.lr,
        total_steps=total_steps,
        micro_batch_size=cfg.micro_batch_size,
        grad_accum=grad_accum,
        config=cfg,
        resumes_zero_state=cfg.resume and zero_partitioned(latest_state(out / "state")),
    )

    start_step = 0
    if cfg.resume:
        state = load_training_state({"reward_model": engine}, latest_state(out / "state"))
        start_step = int(state["step"])
        if info.is_main:
            truncate_metrics(out, start_step)
            console.print(f"resumed from step {start_step} of {total_steps}")
    tracker = Tracker(
        out,
        enabled=info.is_main,
        tensorboard=cfg.tensorboard,
        wandb_project=cfg.wandb_project,
        run_name=out.name,
        config=cfg,
    )
    if info.is_main:
        write_config({**dataclasses.asdict(cfg), SURVEY_KEY: survey.record()}, out, "run_config.json")

    evaluate = lambda: evaluate_pairs(  # noqa: E731
        engine,
        segmenter,
        data.eval,
        segmentation,
        micro_batch_size=cfg.micro_batch_size,
        pad_token_id=tokenizer.pad_token_id,
        info=info,
        use_margin=cfg.margin,
    )
    metadata = SegppoMetadata(
        kind="reward_model",
        granularity=segmentation.granularity,
        threshold=survey.threshold,  # None for token and bandit RMs: they have no threshold
        threshold_choice=survey.threshold_choice,
        segment_stats=survey.record()["segment_stats"],
        # loaded by eval, fit-normalizer and ppo train wherever they run
        segmenter=as_recorded(cfg.segmenter or cfg.model) if segmentation.needs_entropy else None,
        # template, its variables, stop ids, end of turn
        **ChatFormat(
            tokenizer, cfg.chat_template, template_kwargs=cfg.chat_template_kwargs
        ).metadata_fields(),
        base_model=as_recorded(cfg.model),
        data={
            "dataset": as_recorded(cfg.dataset),
            "split": cfg.split,
            "eval_split": data.eval_split,
            "eval_fraction": cfg.eval_fraction if data.eval_split is None else None,
            "seed": cfg.seed,
            "train_pairs": len(data.train),
            "eval_pairs": len(data.eval),
            "skipped_rows": data.train_report.skipped + data.eval_report.skipped,
        },
    )

    engine.train()
    with LiveProgress(total_steps, "rm train", enabled=info.is_main, completed=start_step) as progress:
        for step in range(start_step, total_steps):
            epoch, index = divmod(step, steps_per_epoch)
            order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(cfg.seed + epoch))
            global_batch = order[index * cfg.batch_size : (index + 1) * cfg.batch_size].tolist()
            per_rank = cfg.batch_size // info.world_size
            mine = global_batch[info.rank * per_rank : (info.rank + 1) * per_rank]
            sums = torch.zeros(3, device=info.device)  # loss·n, correct, n
            lr = scheduler.get_last_lr()[0]  # what this step's optimizer update uses (stepped after it)
            for micro in batches(mine, cfg.micro_batch_size):
                pairs = [data.train[i] for i in micro]
                chosen, rejected, margin = score_pairs(
                    engine,
                    segmenter,
                    pairs,
                    segmentation,
                    tokenizer.pad_token_id,
                    info.device,
                    packing=cfg.packing,
                )
                n = len(pairs)
                loss = bradley_terry_loss(chosen, rejected, margin if cfg.margin else None)
                engine.backward(loss)
                engine.step()
                sums += torch.stack(
                    [loss.detach() * n, (chosen > rejected).sum().float(), loss.new_tensor(float(n))]
                )
            all_reduce_sum(sums)
            loss_value = (sums[0] / sums[2]).item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"step {step + 1}: the loss is {loss_value}; the last saved state is in {out / 'state'}"
                )
            metrics = {
                "loss": loss_value,
                "accuracy": (sums[1] / sums[2]).item(),
                "lr": lr,
                "epoch": epoch,
            }
            done = step + 1
            tracker.log(done, metrics)
            tokens = sum(pair_tokens(data.train[i]) for i in global_batch)
            progress.update(1, tokens=tokens, loss=metrics["loss"], acc=metrics["accuracy"])
            if cfg.eval_every and done % cfg.eval_every == 0 and done < total_steps:
                engine.eval()
                tracker.log(done, evaluate(), split="eval")
                engine.train()
            if cfg.save_every and done % cfg.save_every == 0 and done < total_steps:
                save_training_state(
                    {"reward_model": engine},
                    out / "state",
                    f"step-{done}",
                    {"step": done},
                    keep=cfg.save_total_limit,
                )
                _export(
                    engine, tokenizer, out / "checkpoints" / f"step-{done}", metadata, info, cfg.lora_export
                )
            if step_callback is not None:
                step_callback(done, metrics)

    engine.eval()
    final = evaluate()
    metadata = dataclasses.replace(metadata, score_mean=final["score_mean"], score_std=final["score_std"])
    # Saved before the final row is logged: a run resumed after its last step evaluates and logs once.
    save_training_state(
        {"reward_model": engine},
        out / "state",
        f"step-{total_steps}",
        {"step": total_steps},
        keep=cfg.save_total_limit,
    )
    tracker.log(total_steps, final, split="eval")
    _export(engine, tokenizer, out / "model", metadata, info, cfg.lora_export)
    tracker.close()
    if info.is_main:
        console.print(
            f"[bold green]done[/]: eval accuracy {final['accuracy']:.3f}, loss {final['loss']:.4f} "
            f"on {final['num_pairs']} pairs → {out / 'model'}"
        )


# The key of run_config.json that records the segmentation the run measured (and, with `auto`, chose).
SURVEY_KEY = "segmentation"


def _segment_survey(
    cfg: RMConfig, segmenter, train: list[EncodedPair], pad_token_id: int, info: DistInfo
) -> SegmentSurvey:
    """The run's segmentation and segment statistics: measured once, before the first step, and
    read back from run_config.json on `--resume` (an `auto` threshold is never chosen twice)."""
    recorded = cfg.output_dir / "run_config.json"
    if cfg.resume and recorded.is_file():
        record = json.loads(recorded.read_text()).get(SURVEY_KEY)
        if record is not None:
            return SegmentSurvey.from_record(record)
    survey = survey_segments(
        segmenter,
        train,
        granularity=cfg.granularity,
        threshold=cfg.entropy_threshold,
        segment_length=cfg.segment_length,
        sample=cfg.segment_sample,
        seed=cfg.seed,
        micro_batch_size=cfg.micro_batch_size,
        pad_token_id=pad_token_id,
        info=info,
    )
    if info.is_main:
        console.print(
            f"[bold]segments[/] ({survey.segmentation.granularity}) on {survey.pairs} training pairs: "
            f"{survey.stats.summary()}"
        )
        choice = survey.threshold_choice or {}
        if choice.get("rule") == "auto":
            console.print(
                f"[bold]threshold[/] {survey.threshold:.4g}: auto, the {choice['quantile']:.3f} quantile of "
                f"the segmenter's entropy for {choice['segment_length']:g} tokens per segment"
            )
        warning = survey.stats.warning(survey.segmentation.granularity)
        if warning:
            console.print(f"[yellow]warning:[/] {warning}")
    return survey


def _export(
    engine, tokenizer, folder: Path, metadata: SegppoMetadata, info: DistInfo, lora_export: str
) -> None:
    """Write a Hugging Face folder of the engine's model (rank 0; gathered under ZeRO-3); a LoRA
    model merged, or its adapter alone (`--lora-export`)."""
    state = full_state_dict(engine)
    if info.is_main:
        save_reward_model(
            engine.module, tokenizer, folder, metadata, state_dict=state, lora_export=lora_export
        )
    torch.distributed.barrier()
