"""The public model object: `mer.load_model(path)` and what it returns."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from mer.cache.streamer import ExpertStreamer
from mer.errors import ModelFormatError, ParamError
from mer.kernels.matmul import ACTIVATIONS, packing, set_num_threads
from mer.models.args import ModelArgs
from mer.models.transformer import ContextFullError, KVCache, NonFiniteError, Transformer
from mer.models.weights import ModelWeights
from mer.sampling import SamplingParams
from mer.tokenizer import Tokenizer

# What quantized weights meet when nothing says otherwise, as in every CPU engine: 8-bit
# activations and integer dot products ("f32" keeps float activations).
DEFAULT_ACTIVATIONS = "q8"


class Model:
    """A loaded model: tokenizer, weights and the forward pass."""

    def __init__(
        self,
        args: ModelArgs,
        weights: ModelWeights,
        tokenizer: Tokenizer | None,
        source: Path,
        streamer: ExpertStreamer | None = None,
    ) -> None:
        self.args = args
        self.weights = weights
        self.tokenizer = tokenizer
        self.source = source
        self.transformer = Transformer(args, weights)
        self.transformer.streamer = self.streamer = streamer

    def expert_stats(self) -> dict | None:
        """Telemetry of the expert cache (see ExpertStreamer.telemetry), or None when every
        expert is resident."""
        return None if self.streamer is None else self.streamer.telemetry()

    def close(self) -> None:
        """Free the expert cache's shared memory and close its files (streamed models)."""
        if self.streamer is not None:
            self.streamer.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def new_cache(self) -> KVCache:
        return KVCache(self.args)

    def forward(self, tokens: np.ndarray, cache: KVCache, all_logits: bool = True) -> np.ndarray:
        """Transformer.forward, with corrupt weights reported as the file they came from."""
        return self.forward_batch([(tokens, cache)], all_logits)[0]

    def forward_batch(
        self, batch: list[tuple[np.ndarray, KVCache]], all_logits: bool = False
    ) -> list[np.ndarray]:
        """Transformer.step (several sequences at once), with corrupt weights reported as the
        file they came from."""
        try:
            return self.transformer.step(batch, all_logits)
        except NonFiniteError as err:
            file = self._file_of(err.part)
            raise ModelFormatError(f"{err}: the weights in {file} are corrupt") from None

    def _file_of(self, part: str) -> Path:
        from mer.store import format as fmt

        if fmt.is_store(self.source):
            return self.source / (fmt.EXPERTS_FILE if part == "experts" else fmt.DENSE_FILE)
        return self.source

    def warm_up(self) -> None:
        """Compile (or load from numba's cache) every kernel this model runs, on tiny inputs, so
        that the first tokens do not pay for it."""
        from mer.kernels.warm import warm_up

        experts = None if self.streamer is None else self.streamer.sample_experts()
        warm_up(self.args, self.weights, experts)

    def logits(self, token_ids: Sequence[int], chunk_size: int | None = None) -> np.ndarray:
        """float32 [len(token_ids), vocab]: next-token logits at every position of a fresh sequence.

        chunk_size=None runs one prefill; chunk_size=k feeds k tokens at a time through the KV
        cache (k=1 is token-by-token decoding). Results agree either way.
        """
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.ndim != 1 or len(ids) == 0:
            raise ValueError("logits: token_ids must be a non-empty sequence of ints")
        cache = self.new_cache()
        step = len(ids) if chunk_size is None else chunk_size
        parts = [self.forward(ids[i : i + step], cache) for i in range(0, len(ids), step)]
        return np.concatenate(parts, axis=0)

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        max_tokens: int = 256,
        stop_ids: frozenset[int] | None = None,
    ) -> Generation:
        """The sampled ids, as an iterable `Generation` that ends at a stop id (not yielded),
        after max_tokens, or when the context is full; its `finish_reason` says which."""
        if not prompt_ids:
            raise ValueError("generate: the prompt is empty")
        if max_tokens < 0:
            raise ParamError("max_tokens", f"must be zero or more, got {max_tokens}")
        if len(prompt_ids) >= self.args.max_seq_len:
            raise ContextFullError(
                f"the prompt has {len(prompt_ids)} tokens: the context of "
                f"{self.args.max_seq_len} tokens leaves no room to generate"
            )
        if stop_ids is None:
            stop_ids = self.tokenizer.eos_token_ids if self.tokenizer else frozenset()
        return Generation(self, list(prompt_ids), params or SamplingParams(), max_tokens, stop_ids)


class Generation:
    """The tokens of one generation, produced as it is iterated (once): a batch of one through
    the engine (`mer.engine`).

    finish_reason, once iteration ends: "stop" (a stop id came), "length" (max_tokens were
    generated) or "context" (prompt and generated tokens fill the context)."""

    def __init__(
        self, model: Model, history: list[int], params: SamplingParams, max_tokens: int, stop_ids
    ) -> None:
        from mer.engine.engine import Engine
        from mer.engine.scheduler import SchedulerConfig

        # one sequence: its KV room is the whole context, whatever the service's budget, and
        # no prefix cache (nothing after it would reuse one)
        config = SchedulerConfig(
            kv_budget_tokens=max(model.args.max_seq_len, 1), prefix_cache=False
        )
        self._engine = Engine(model, config)
        self._seq = self._engine.submit(history, params, max_tokens, stop_ids)
        self._started = False

    @property
    def finish_reason(self) -> str | None:
        return self._seq.finish_reason

    def __iter__(self) -> Iterator[int]:
        if self._started:
            raise RuntimeError("a Generation can be iterated only once")
        self._started = True
        return self._tokens()

    def _tokens(self) -> Iterator[int]:
        for event in self._engine.run():
            if event.token is not None:
                yield event.token


def load_model(
    path: str | Path,
    *,
    quant: str | None = None,
    threads: int | None = None,
    max_seq_len: int | None = None,
    cache_bytes: int | None = None,
    io_backend: str = "auto",
    verify: bool = True,
    prefetch: bool = True,
    coalesce: bool = True,
    streamer_factory=None,
    activations: str | None = None,
) -> Model:
    """Load a model from a mer store, a Hugging Face directory or a GGUF file.

    quant: "q8_0" or "q4_0" quantizes expert (FFN) weights on load; threads: kernel threads
    (default: all cores); max_seq_len: cap the context below the model's own maximum.
    cache_bytes: stream experts from disk through a RAM cache of this many bytes instead of
    loading them all; io_backend: "auto", "uring", "preadv" or "buffered"; verify: check
    expert checksums (stores) on every read; prefetch: read predicted experts ahead;
    coalesce: read experts that follow each other on disk with one request;
    streamer_factory(source, args): what streams the experts instead of an in-process
    `ExpertStreamer` (the service's engine: `mer.cache.remote`).
    activations: "q8" runs quantized weights (every GGUF block type mer reads) against
    activations quantized to 8 bits, with integer dot products as llama.cpp computes them
    (several times faster); "f32" against float activations (within float rounding of the
    dequantized weights, as transformers computes them). None: a store's own (as `mer
    convert --activations` made it), else "q8". Experts streamed later are packed in the
    same mode.
    """
    from dataclasses import replace

    from mer.cache.sources import FileExperts

    source = Path(path)
    if threads is not None:
        set_num_threads(threads)
    stream = cache_bytes is not None
    args, weights, tokenizer, experts = open_model_files(
        source, quant, stream, verify, activations=activations
    )
    if max_seq_len is not None:
        args = replace(args, max_seq_len=min(args.max_seq_len, max_seq_len))
    streamer = None
    if stream:
        if experts is None:  # streamed straight from the model's own files
            experts = FileExperts([layer.experts for layer in weights.layers])
        if streamer_factory is not None:
            return Model(args, weights, tokenizer, source, streamer_factory(experts, args))
        streamer = ExpertStreamer(
            experts,
            cache_bytes,
            n_experts_per_tok=args.n_experts_per_tok,
            backend=io_backend,
            verify=verify,
            prefetch=prefetch,
            coalesce=coalesce,
        )
    return Model(args, weights, tokenizer, source, streamer)


def open_model_files(
    source: Path,
    quant: str | None = None,
    stream: bool = False,
    verify: bool = True,
    *,
    activations: str | None = None,
) -> tuple:
    """(args, weights, tokenizer or None, StoreExperts or None) of a mer store, a Hugging Face
    directory or a GGUF file. With `stream`, the layers list where experts lie on disk (a store
    serves them through its StoreExperts) instead of holding them. `activations`: as in
    `load_model`."""
    from mer.store.format import is_store, is_unfinished_store
    from mer.store.load import load_store

    if activations is not None and activations not in ACTIVATIONS:
        choices = ", ".join(ACTIVATIONS)
        raise ParamError(f"activations must be one of {choices}, got {activations!r}")
    if not source.exists():
        raise ModelFormatError(f"{source}: no such model file or directory")
    if is_unfinished_store(source):
        raise ModelFormatError(
            f"{source}: an unfinished mer store (its conversion was interrupted): "
            "run `mer convert` into it again with --force"
        )
    if is_store(source):
        if quant is not None:
            raise ModelFormatError(
                f"{source}: a mer store is already packed; choose --quant at `mer convert`"
            )
        return load_store(source, stream=stream, verify=verify, activations=activations)
    with packing(activations or DEFAULT_ACTIVATIONS):
        return _open_source(source, quant, stream)


def _open_source(source: Path, quant: str | None, stream: bool) -> tuple:
    from mer.models.gguf import load_gguf
    from mer.models.hf import load_hf_dir

    if source.is_dir():
        args, weights = load_hf_dir(source, quant, stream=stream)
        tokenizer = Tokenizer.from_hf_dir(source) if (source / "tokenizer.json").exists() else None
        return args, weights, tokenizer, None
    if quant is not None:
        raise ModelFormatError(
            f"{source}: --quant applies to Hugging Face checkpoints; "
            "GGUF files are already quantized"
        )
    return (*load_gguf(source, stream=stream), None)
