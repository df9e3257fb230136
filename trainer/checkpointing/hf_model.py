"""A hylo model as a Hugging Face transformers model: what `hylo export --format hf` writes a folder for.

The exported folder's `modeling_hylo.py` imports this module, so the layers that run are hylo's own
(`hylo.models`), never a second copy: hylo installed is the requirement, as fla's models require fla.

  HyloConfig        a PretrainedConfig: hylo's whole ModelConfig in `hylo_model` (the pattern included, under its
                    own name: `layer_types` takes only transformers' own names), plus the standard size fields
  HyloForCausalLM   PreTrainedModel + GenerationMixin around hylo.models.lm.HybridLM: logits, `labels=` loss,
                    attention masks (left or right padding: each row runs on its own tokens, exactly as alone),
                    and generation through each layer's recurrent cache (HyloCache)
  HyloCache         a transformers Cache whose layers hold hylo's decoding state per layer (RAT's chunk state,
                    BASED's linear state and window, lightning's state, the short-conv tail, attention's k/v with
                    its window and sink-aware softmax), per group of rows that share a position
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from hylo.models.lm import HybridLM
from hylo.trainer.config import ModelConfig


def model_config(record: dict[str, Any]) -> ModelConfig:
    """hylo's typed ModelConfig from its JSON record (as `hylo export` writes it)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), record))


class HyloConfig(PretrainedConfig):
    model_type = "hylo"

    def __init__(self, hylo_model: dict[str, Any] | None = None, max_position_embeddings: int = 2048, **kwargs):
        self.hylo_model = dict(hylo_model or {})
        self.vocab_size = self.hylo_model.get("vocab_size", 0)
        self.hidden_size = self.hylo_model.get("d_model", 0)
        self.num_hidden_layers = self.hylo_model.get("n_layers", 0)
        self.num_attention_heads = self.hylo_model.get("n_heads", 0)
        self.max_position_embeddings = max_position_embeddings  # the training length: lm-eval's context
        # hylo ties the head to the embedding inside its module (one tensor): nothing for transformers to tie
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)


def _index_rows(state: Any, rows: torch.Tensor) -> Any:
    """A layer's decoding state with its batch rows picked (dicts, tuples and lists of batch-first tensors)."""
    if isinstance(state, torch.Tensor):
        return state.index_select(0, rows.to(state.device))
    if isinstance(state, dict):
        return {key: _index_rows(value, rows) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_index_rows(value, rows) for value in state)
    return state  # positions and other scalars


class HyloCacheLayer(CacheLayerMixin):
    """One layer's decoding state, one entry per row group (rows that share their length decode together)."""

    is_compileable = False
    is_sliding = False

    def __init__(self):
        super().__init__()
        self.states: list[Any] = []
        self.seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate ahead: hylo's layers build their state as they run."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise NotImplementedError("hylo's layers keep their own decoding state (HyloForCausalLM updates it)")

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1  # grows with the sequence (attention) or stays fixed (the recurrent layers)

    def reset(self) -> None:
        self.states, self.seen = [], 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if len(self.states) > 1:
            raise NotImplementedError("beam search over rows of different lengths (left padding) is not supported")
        self.states = [_index_rows(state, beam_idx) for state in self.states]


class HyloCache(Cache):
    """The decoding state of a whole hylo model: per layer, per row group; `groups` holds each group's rows and the
    position its next token decodes at."""

    def __init__(self, n_layers: int):
        super().__init__(layers=[HyloCacheLayer() for _ in range(n_layers)])
        self.groups: list[tuple[torch.Tensor, int]] = []  # (row indices, next position)

    def group_caches(self, group: int) -> list:
        return [layer.states[group] for layer in self.layers]

    def store(self, group: int, caches: list, seen: int) -> None:
        for layer, state in zip(self.layers, caches, strict=True):
            if group == len(layer.states):
                layer.states.append(state)
            else:
                layer.states[group] = state
            layer.seen = seen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.reorder_cache(beam_idx)
        self.groups = [(torch.arange(len(beam_idx)), pos) for _, pos in self.groups]


def _row_spans(attention_mask: torch.Tensor | None, batch: int, length: int) -> list[tuple[int, int]]:
    """Each row's tokens as (start, end): everything without a mask; the attended ones with it, which must be one
    run (left or right padding)."""
    if attention_mask is None:
        return [(0, length)] * batch
    spans = []
    for row in attention_mask.bool():
        idx = row.nonzero().flatten().tolist()
        if not idx or idx[-1] - idx[0] + 1 != len(idx):
            raise ValueError("attention_mask rows must attend one run of tokens (left or right padding)")
        spans.append((idx[0], idx[-1] + 1))
    return spans


class HyloForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HyloConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys: dict[str, str] = {}  # the head is the embedding inside hylo's module: one tensor
    _no_split_modules = ["Block"]
    _supports_cache_class = True

    def __init__(self, config: HyloConfig):
        super().__init__(config)
        self.model = HybridLM(model_config(config.hylo_model))
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """The weights load from the folder; what no checkpoint stores (RoPE frequencies, TNL's slopes) is
        recomputed from the config, since transformers builds the modules on the meta device."""
        if hasattr(module, "rebuild_buffers"):
            module.rebuild_buffers()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not build a DynamicCache: the first forward returns a HyloCache

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: HyloCache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits (batch, seq, vocab) of `input_ids`; with `labels`, hylo's mean next-token loss (-100 ignored).
        Padded rows (an `attention_mask`) run on their own tokens only.  With `use_cache`, the first call (no
        cache) prefills and returns a HyloCache; later calls take one new token per row and decode it through
        the cache (`position_ids` are not needed: hylo keeps each row's position)."""
        if inputs_embeds is not None:
            raise ValueError("hylo models take input_ids, not inputs_embeds")
        use_cache = bool(use_cache) if use_cache is not None else False
        if cache is not None and cache.groups:
            logits = self._decode(input_ids, cache)
        else:
            cache = HyloCache(len(self.model.blocks)) if use_cache else None
            # generate asks for the last logits only: the prefill gives them with the caches, in one pass
            last_only = cache is not None and labels is None and isinstance(logits_to_keep, int) and logits_to_keep == 1
            logits = self._full(input_ids, attention_mask, cache, last_only)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                     ignore_index=-100)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def _full(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: HyloCache | None,
              last_only: bool = False):
        batch, length = input_ids.shape
        spans = _row_spans(attention_mask, batch, length)
        last_only = last_only and all(end == length for _, end in spans)  # (left padding, or none)
        logits = torch.zeros(batch, 1 if last_only else length, self.model.cfg.vocab_size,
                             dtype=self.model.embed.weight.dtype, device=input_ids.device)
        by_span: dict[tuple[int, int], list[int]] = {}
        for row, span in enumerate(spans):
            by_span.setdefault(span, []).append(row)
        for (start, end), rows in by_span.items():  # rows of one span run as one batch, exactly as alone
            index = torch.tensor(rows, device=input_ids.device)
            tokens = input_ids[index, start:end]
            if cache is not None:
                last, caches = self.model.prefill(tokens)
                cache.store(len(cache.groups), caches, length)
                cache.groups.append((index, end - start))
                if last_only:
                    logits[index, 0] = last.to(logits.dtype)
                    continue
            logits[index, start:end] = self.model(tokens).to(logits.dtype)
        return logits

    def _decode(self, input_ids: torch.Tensor, cache: HyloCache) -> torch.Tensor:
        if input_ids.shape[1] != 1:
            raise ValueError("after the first call, a cached hylo model takes one new token per row")
        seen = cache.get_seq_length() + 1
        if len(cache.groups) == 1:  # rows of one length (no padding): one batched step, nothing to scatter
            index, pos = cache.groups[0]
            step_logits, caches = self.model.step(input_ids[:, 0], pos, cache.group_caches(0))
            cache.store(0, caches, seen)
            cache.groups[0] = (index, pos + 1)
            return step_logits[:, None]
        logits = torch.zeros(input_ids.shape[0], 1, self.model.cfg.vocab_size, dtype=self.model.embed.weight.dtype,
                             device=input_ids.device)
        for group, (index, pos) in enumerate(cache.groups):
            step_logits, caches = self.model.step(input_ids[index.to(input_ids.device), 0], pos,
                                                  cache.group_caches(group))
            logits[index, 0] = step_logits.to(logits.dtype)
            cache.store(group, caches, seen)
            cache.groups[group] = (index, pos + 1)
        return logits
