"""The three model families, built from one ModelConfig.

Token id 0 is padding. Decoder inputs are passed already shifted (see `ops.shift_right`), so
training code can feed other histories (e.g. scheduled sampling) without touching the model.
Packed batches pass segment ids (0 = padding) and per-sequence positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxformer_lite import ops
from flaxformer_lite.config import ModelConfig
from flaxformer_lite.model.attention import relative_table
from flaxformer_lite.model.blocks import DecoderLayer, EncoderLayer, run_layers
from flaxformer_lite.model.layers import Dropout, Embed, Norm, dense
from flaxformer_lite.sharding import CLASSES, EMBED, LENGTH, MLP, VOCAB

Array = jax.Array


def variant(model: nn.Module, **changes) -> nn.Module:
    """The same model with config fields changed, e.g. `variant(model, deterministic=True)`."""
    return model.clone(config=model.config.replace(**changes))


def _default_positions(tokens: Array, positions: Array | None) -> Array:
    return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape) if positions is None else positions


class _Positions(nn.Module):
    """Adds absolute positions (learned or sinusoidal; others act in attention) and token types to
    the embeddings, then the optional embedding norm and dropout."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, positions: Array, token_types: Array | None = None) -> Array:
        cfg = self.config
        if cfg.type_vocab_size:
            types = jnp.zeros_like(positions) if token_types is None else token_types
            x = x + Embed(cfg.type_vocab_size, cfg, axes=(None, EMBED), name="token_types")(types)
        if cfg.position == "learned":
            x = x + Embed(cfg.max_len, cfg, axes=(LENGTH, EMBED), name="table")(positions)
        elif cfg.position == "sinusoidal":
            # A host constant, gathered per token.
            table = ops.sinusoidal_table(cfg.max_len, cfg.d_model, layout=cfg.sinusoid_layout)
            x = x + jnp.take(jnp.asarray(table, x.dtype), positions, axis=0)
        if cfg.embedding_norm:
            x = Norm(cfg, name="embedding_norm")(x)
        return Dropout(cfg.dropout_rate, cfg.deterministic)(x)


class Encoder(nn.Module):
    """Token embedding + positions -> bidirectional layers -> final norm (pre-LN only)."""

    config: ModelConfig
    embed: Embed

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        segment_ids: Array,
        positions: Array | None = None,
        token_types: Array | None = None,
    ) -> Array:
        """[B, S] ids and segment ids (and token types, with config.type_vocab_size) -> [B, S, d_model]."""
        cfg = self.config
        positions = _default_positions(tokens, positions)
        x = _Positions(cfg, name="positions")(self.embed(tokens), positions, token_types)
        x = run_layers(
            cfg, EncoderLayer, cfg.num_encoder_layers, x, segment_ids, positions, _shared_table(self)
        )
        return Norm(cfg, name="final_norm")(x) if cfg.pre_norm else x


class Decoder(nn.Module):
    """Causal layers (with cross-attention if `cross`) -> final norm -> vocabulary logits."""

    config: ModelConfig
    embed: Embed
    cross: bool = True

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        encoded: Array | None = None,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        encoded_segment_ids: Array | None = None,
        hidden_only: bool = False,
    ) -> Array:
        """[B, T] ids -> [B, T, vocab] logits (compute dtype; losses upcast to float32), or with
        `hidden_only` the final [B, T, d_model] states (for a classification head, no LM head)."""
        cfg = self.config
        if cfg.memory_length and not cfg.decode:
            _check_memory_inputs(self.cross, segment_ids, positions)
        if positions is None and cfg.decode:
            # Decoding one chunk at a time: continue positions from where the last call stopped.
            creating = not self.has_variable("cache", "position_index")
            index = self.variable("cache", "position_index", lambda: jnp.array(0, jnp.int32))
            positions = jnp.broadcast_to(index.value + jnp.arange(tokens.shape[1]), tokens.shape)
            if not creating:
                index.value = index.value + tokens.shape[1]
        positions = _default_positions(tokens, positions)
        x = _Positions(cfg, name="positions")(self.embed(tokens), positions)
        x = run_layers(
            cfg,
            DecoderLayer,
            cfg.num_decoder_layers,
            x,
            encoded,
            segment_ids,
            positions,
            encoded_segment_ids,
            _shared_table(self),
            cross=self.cross,
        )
        if cfg.pre_norm:
            x = Norm(cfg, name="final_norm")(x)
        return x if hidden_only else _vocab_logits(self, cfg, self.embed, x, "logits")


def _check_memory_inputs(cross: bool, segment_ids, positions) -> None:
    """Transformer-XL memory (model/memory.py) is for decoder-only LMs fed documents as streams."""
    if cross:
        raise ValueError("memory_length is for decoder-only LMs: set it to 0 for an encoder-decoder.")
    if segment_ids is None or positions is None:
        raise ValueError(
            "a model with memory_length needs document ids and positions that continue across "
            "segments: pass segment_ids and positions (data/streams.py makes them)."
        )


def _shared_table(stack: nn.Module) -> Array | None:
    """The stack's one relative-bias table (T5), or None: each layer keeps its own, or none."""
    cfg = stack.config
    return relative_table(stack, cfg) if cfg.position == "relative" and cfg.shared_relative_bias else None


def _vocab_logits(module: nn.Module, cfg: ModelConfig, embed: Embed, x: Array, name: str) -> Array:
    """[B, T, d_model] -> [B, T, vocab]: the tied embedding or a dense `name`, plus `logits_bias`
    (then the only bias: Marian's final_logits_bias, BERT's MLM output bias)."""
    if cfg.tie_embeddings:
        logits = embed.attend(x * cfg.d_model**-0.5 if cfg.rescale_tied_logits else x)
    else:
        head_cfg = cfg.replace(use_bias=False) if cfg.logits_bias else cfg
        logits = dense(head_cfg, cfg.vocab_size, (EMBED, VOCAB), name)(x)
    if cfg.logits_bias:
        zeros = nn.with_logical_partitioning(nn.initializers.zeros, (VOCAB,))
        bias = module.param("logits_bias", zeros, (cfg.vocab_size,), cfg.param_dtype)
        logits = logits + bias.astype(cfg.dtype)[None, None, :]
    return logits


def _token_embed(cfg: ModelConfig) -> Embed:
    return Embed(cfg.vocab_size, cfg, scale=cfg.scale_embeddings, name="token_embed")


class EncoderDecoder(nn.Module):
    """Translation model: encoder over source ids, decoder over shifted target ids."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.embed = _token_embed(cfg)
        source_embed = self.embed
        if cfg.source_vocab_size is not None:  # separate source and target vocabularies
            source_embed = Embed(cfg.source_vocab_size, cfg, scale=cfg.scale_embeddings, name="source_embed")
        self.encoder = Encoder(cfg, source_embed)
        self.decoder = Decoder(cfg, self.embed, cross=True)

    def encode(self, inputs: Array, segment_ids: Array | None = None, positions: Array | None = None):
        """[B, S] source ids -> [B, S, d_model]. Without segment ids, id 0 marks padding."""
        return self.encoder(inputs, _source_segments(inputs, segment_ids), positions)

    def decode(
        self,
        encoded: Array | None,
        decoder_inputs: Array,
        *,
        inputs: Array | None = None,
        inputs_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
        decoder_positions: Array | None = None,
    ) -> Array:
        """Encoded source, [B, T] shifted target ids -> [B, T, vocab] logits.

        The source's padding comes from `inputs_segment_ids`, or from `inputs` (id 0 = padding).
        With `config.decode` the encoder output is read only when the cache is created.
        """
        if inputs_segment_ids is None and inputs is not None:
            inputs_segment_ids = _source_segments(inputs, None)
        return self.decoder(
            decoder_inputs, encoded, decoder_segment_ids, decoder_positions, inputs_segment_ids
        )

    def __call__(
        self,
        inputs: Array,
        decoder_inputs: Array,
        *,
        inputs_segment_ids: Array | None = None,
        inputs_positions: Array | None = None,
        decoder_segment_ids: Array | None = None,
        decoder_positions: Array | None = None,
    ) -> Array:
        """[B, S] source ids, [B, T] shifted target ids -> [B, T, vocab] logits."""
        inputs_segment_ids = _source_segments(inputs, inputs_segment_ids)
        encoded = self.encode(inputs, inputs_segment_ids, inputs_positions)
        return self.decode(
            encoded,
            decoder_inputs,
            inputs_segment_ids=inputs_segment_ids,
            decoder_segment_ids=decoder_segment_ids,
            decoder_positions=decoder_positions,
        )


def _source_segments(inputs: Array, segment_ids: Array | None) -> Array:
    return (inputs != 0).astype(jnp.int32) if segment_ids is None else segment_ids


class DecoderOnly(nn.Module):
    """GPT-style causal language model: [B, T] ids -> [B, T, vocab] next-token logits."""

    config: ModelConfig

    def setup(self):
        self.embed = _token_embed(self.config)
        self.decoder = Decoder(self.config, self.embed, cross=False)
        # Created only when `classify` runs: an LM's params never hold it.
        self.classifier = dense(self.config, self.config.num_classes, (EMBED, CLASSES), "classifier")

    def __call__(
        self, tokens: Array, *, segment_ids: Array | None = None, positions: Array | None = None
    ) -> Array:
        """Right padding needs no segment ids (causality hides it); packed or left-padded rows do.

        With `config.memory_length` (Transformer-XL, model/memory.py) segment_ids are document ids
        and positions offsets in the document, both continuing across calls; pass the "memory"
        collection and make it mutable to carry it from segment to segment.
        """
        return self.decoder(tokens, None, segment_ids, positions)

    def classify(
        self, tokens: Array, pool: Array, *, segment_ids: Array | None = None, positions: Array | None = None
    ) -> Array:
        """[B, T] ids, [B, S, T] pooling weights (`ops.pooling`) -> [B, S, num_classes] logits.

        GPT (Radford et al. 2018): a linear layer on the pooled final states, usually the last
        real token's, the only one that has read the whole sequence.
        """
        hidden = self.decoder(tokens, None, segment_ids, positions, hidden_only=True)
        return self.classifier(jnp.einsum("bst,btd->bsd", pool.astype(hidden.dtype), hidden))


class EncoderOnly(nn.Module):
    """BERT-style encoder with a masked-LM head and a first-token classification head."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        *,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        token_types: Array | None = None,
        pool: Array | None = None,
    ) -> tuple[Array, Array]:
        """[B, S] ids -> ([B, S, vocab] MLM logits, [B, num_classes] classification logits).

        The MLM head is BERT's: dense, the config's activation (GELU for a gated one), norm, then
        the vocabulary (tied or not) plus, with `logits_bias`, a bias. The classification head
        reads each row's first token, or with `pool` ([B, P, S] weights, `ops.pooling`) one pooled
        vector per packed sequence: then its logits are [B, P, num_classes].
        """
        cfg = self.config
        embed = _token_embed(cfg)
        segments = _source_segments(tokens, segment_ids)
        x = Encoder(cfg, embed, name="encoder")(tokens, segments, positions, token_types)
        act = ops.ACTIVATIONS["gelu" if cfg.gated else cfg.activation]
        h = Norm(cfg, name="mlm_norm")(act(dense(cfg, cfg.d_model, (EMBED, MLP), "mlm_dense")(x)))
        mlm_logits = _vocab_logits(self, cfg, embed, h, "mlm_logits")
        first = x[:, 0] if pool is None else jnp.einsum("bps,bsd->bpd", pool.astype(x.dtype), x)
        pooled = jnp.tanh(dense(cfg, cfg.d_model, (EMBED, MLP), "pooler")(first))
        class_logits = dense(cfg, cfg.num_classes, (MLP, CLASSES), "classifier")(pooled)
        return mlm_logits, class_logits
