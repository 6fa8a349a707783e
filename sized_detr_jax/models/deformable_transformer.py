"""DINO's deformable transformer: deformable encoder, mixed query selection, refining decoder.

Follows IDEA-Research/DINO `models/dino/deformable_transformer.py` (DeformableTransformer with
two_stage_type="standard", embed_init_tgt=True, decoder_sa_type="sa") and
`models/dino/utils.py gen_encoder_output_proposals`, with the box/class heads of
`models/dino/dino.py` owned here so the decoder can refine boxes with them (one pair shared by
all decoder layers as in DINO, or one pair per layer as in Co-DETR: `share_decoder_heads`):

* encoder: `enc_layers` x (MSDA self-attention over all levels, FFN), post-norm;
* mixed query selection: per-token proposals (grid centre, w = h = 0.05 * 2^level), the top-Q
  tokens by the encoder head's max class logit give the *positional* queries (anchor boxes,
  detached); the *content* queries are the learned `tgt_embed`. Which tokens may be selected is
  `query_selection` (see `selection_scores`): "dino" (the official code) or "valid_only";
* decoder: `dec_layers` x (self-attention, MSDA cross-attention, FFN); after each layer the
  (layer's) box MLP refines the reference box (detached for the next layer), and the box reported
  for layer i is `sigmoid(box_mlp(norm(h_i)) + inverse_sigmoid(ref_i))` with `ref_i` the
  *undetached* refinement of layer i-1 (look-forward-twice).

Masks are True on real pixels/tokens. All boxes are normalised cxcywh; reference boxes passed to
MSDA are scaled by the valid ratios (normalised to the padded map) as in DINO.
"""
import functools
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sized_detr_jax.models import attention
from sized_detr_jax.models.layers import MLP, inverse_sigmoid
from sized_detr_jax.models.msda import multi_scale_deformable_attention
from sized_detr_jax.models.position_encoding import sine_embedding_of_boxes

_xavier = nn.initializers.xavier_uniform()
PROPOSAL_WH = 0.05  # DINO two_stage_default_hw


def _dense(features, name, dtype, kernel_init=_xavier, bias_init=nn.initializers.zeros):
  return nn.Dense(features, kernel_init=kernel_init, bias_init=bias_init, dtype=dtype,
                  param_dtype=jnp.float32, name=name)


def _layer_norm(name, dtype):
  # PyTorch LayerNorm eps.
  return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, name=name)


def _sampling_offset_bias(n_heads, n_levels, n_points):
  """Deformable-DETR's offset bias: head h points along angle 2*pi*h/heads, point k at k+1."""
  def init(key, shape, dtype=jnp.float32):
    del key
    thetas = np.arange(n_heads) * (2.0 * math.pi / n_heads)
    grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None, :], (1, n_levels, n_points, 1))
    grid = grid * np.arange(1, n_points + 1)[None, None, :, None]
    return jnp.asarray(grid.reshape(shape), dtype)
  return init


class MSDeformAttn(nn.Module):
  """Multi-scale deformable attention module (Deformable-DETR `MSDeformAttn`).

  Attributes:
    d_model, n_levels, n_heads, n_points: as in Deformable-DETR.
    dtype: compute dtype; sampling locations are computed in float32.
    implementation: `msda.IMPLEMENTATIONS` key of the sampling kernel.
  """
  d_model: int = 256
  n_levels: int = 4
  n_heads: int = 8
  n_points: int = 4
  dtype: Any = jnp.float32
  implementation: str = "gather"

  @nn.compact
  def __call__(self, query, reference_points, value_input, spatial_shapes, value_mask):
    """Attends from queries to the multi-scale value maps.

    Args:
      query: [B, Q, C] queries (with positional embedding added).
      reference_points: [B, Q, L, 2] normalised (x, y) or [B, Q, L, 4] normalised cxcywh
        boxes, relative to each padded level map (already times the valid ratios).
      value_input: [B, S, C] flattened multi-level features.
      spatial_shapes: static tuple of (H_l, W_l).
      value_mask: [B, S] bool, True on real tokens (padding tokens get value 0).

    Returns:
      [B, Q, C].
    """
    b, q, _ = query.shape
    h, l, p = self.n_heads, self.n_levels, self.n_points
    if self.d_model % h:
      raise ValueError(f"MSDeformAttn: d_model {self.d_model} not divisible by heads {h}")
    value = _dense(self.d_model, "value_proj", self.dtype)(value_input)
    value = jnp.where(value_mask[..., None], value, 0).astype(self.dtype)
    value = value.reshape(b, -1, h, self.d_model // h)
    offsets = _dense(h * l * p * 2, "sampling_offsets", self.dtype,
                     kernel_init=nn.initializers.zeros,
                     bias_init=_sampling_offset_bias(h, l, p))(query)
    offsets = offsets.reshape(b, q, h, l, p, 2).astype(jnp.float32)
    weights = _dense(h * l * p, "attention_weights", self.dtype,
                     kernel_init=nn.initializers.zeros)(query)
    weights = jax.nn.softmax(weights.reshape(b, q, h, l * p).astype(jnp.float32), axis=-1)
    weights = weights.reshape(b, q, h, l, p)
    ref = reference_points.astype(jnp.float32)[:, :, None, :, None, :]  # [B, Q, 1, L, 1, 2|4]
    if reference_points.shape[-1] == 2:
      normaliser = jnp.asarray([(w, hh) for hh, w in spatial_shapes], jnp.float32)  # (W, H)
      locations = ref + offsets / normaliser[None, None, None, :, None, :]
    elif reference_points.shape[-1] == 4:
      locations = ref[..., :2] + offsets / p * ref[..., 2:] * 0.5
    else:
      raise ValueError(f"MSDeformAttn: reference_points last dim must be 2 or 4, got "
                       f"{reference_points.shape}")
    out = multi_scale_deformable_attention(value, spatial_shapes, locations,
                                           weights.astype(self.dtype),
                                           implementation=self.implementation)
    return _dense(self.d_model, "output_proj", self.dtype)(out.astype(self.dtype))


class SelfAttention(nn.Module):
  """`torch.nn.MultiheadAttention` with packed q/k/v projection (query = key, value separate).

  The packed kernel [C, 3C] is Xavier-initialised as one matrix, as PyTorch does.
  """
  d_model: int
  n_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query_key, value, blocked=None):
    """Args: query_key/value [B, T, C]; blocked: optional [B, T, T] bool (True = blocked)."""
    b, t, c = value.shape
    h = self.n_heads
    kernel = self.param("in_proj_kernel", _xavier, (c, 3 * c), jnp.float32).astype(self.dtype)
    bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * c,), jnp.float32)
    bias = bias.astype(self.dtype)
    qk = query_key.astype(self.dtype)
    split = lambda x: x.reshape(b, t, h, c // h)
    q = split(qk @ kernel[:, :c] + bias[:c]) / math.sqrt(c // h)
    k = split(qk @ kernel[:, c:2 * c] + bias[c:2 * c])
    v = split(value.astype(self.dtype) @ kernel[:, 2 * c:] + bias[2 * c:])
    out = attention.dot_product_attention(q, k, v, blocked).reshape(b, t, c)
    return _dense(c, "out_proj", self.dtype)(out)


def _ffn(x, d_model, dim_feedforward, norm_name, dtype):
  """Post-norm FFN block; its Dense/LayerNorm land directly in the calling layer's scope
  (linear1, linear2, norm<k>), matching the PyTorch parameter names."""
  y = _dense(dim_feedforward, "linear1", dtype)(x)
  y = _dense(d_model, "linear2", dtype)(nn.relu(y))
  return _layer_norm(norm_name, dtype)(x + y)


class EncoderLayer(nn.Module):
  """Post-norm deformable encoder layer (DINO DeformableTransformerEncoderLayer)."""
  d_model: int
  dim_feedforward: int
  n_levels: int
  n_heads: int
  n_points: int
  dtype: Any = jnp.float32
  msda_implementation: str = "gather"

  @nn.compact
  def __call__(self, src, pos, reference_points, spatial_shapes, mask):
    attn = MSDeformAttn(self.d_model, self.n_levels, self.n_heads, self.n_points, self.dtype,
                        self.msda_implementation, name="self_attn")
    src = _layer_norm("norm1", self.dtype)(
        src + attn(src + pos, reference_points, src, spatial_shapes, mask))
    return _ffn(src, self.d_model, self.dim_feedforward, "norm2", self.dtype)


class DecoderLayer(nn.Module):
  """DINO DeformableTransformerDecoderLayer, module_seq = (self-attn, cross-attn, FFN)."""
  d_model: int
  dim_feedforward: int
  n_levels: int
  n_heads: int
  n_points: int
  dtype: Any = jnp.float32
  msda_implementation: str = "gather"

  @nn.compact
  def __call__(self, tgt, query_pos, reference_points, memory, spatial_shapes, memory_mask,
               self_attn_blocked):
    q = tgt + query_pos
    tgt = _layer_norm("norm2", self.dtype)(
        tgt + SelfAttention(self.d_model, self.n_heads, self.dtype, name="self_attn")(
            q, tgt, self_attn_blocked))
    cross = MSDeformAttn(self.d_model, self.n_levels, self.n_heads, self.n_points, self.dtype,
                         self.msda_implementation, name="cross_attn")
    tgt = _layer_norm("norm1", self.dtype)(
        tgt + cross(tgt + query_pos, reference_points, memory, spatial_shapes, memory_mask))
    return _ffn(tgt, self.d_model, self.dim_feedforward, "norm3", self.dtype)


def valid_ratios(masks):
  """[B, L, 2] (w, h) fraction of real columns/rows per level (DINO get_valid_ratio).

  Args:
    masks: list of [B, H_l, W_l] bool, True on real pixels.
  """
  ratios = []
  for m in masks:
    _, h, w = m.shape
    valid_h = jnp.sum(m[:, :, 0], axis=1).astype(jnp.float32)
    valid_w = jnp.sum(m[:, 0, :], axis=1).astype(jnp.float32)
    ratios.append(jnp.stack([valid_w / w, valid_h / h], axis=-1))
  return jnp.stack(ratios, axis=1)


def encoder_reference_points(spatial_shapes, ratios):
  """Token centres, normalised to the real image, then scaled per level by the valid ratios.

  Args:
    spatial_shapes: static tuple of (H_l, W_l).
    ratios: [B, L, 2] valid ratios (w, h).

  Returns:
    [B, S, L, 2] (x, y) reference points for each token at each level.
  """
  points = []
  for lvl, (h, w) in enumerate(spatial_shapes):
    ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    ref_y = jnp.asarray(ys.reshape(-1))[None] / (ratios[:, None, lvl, 1] * h)
    ref_x = jnp.asarray(xs.reshape(-1))[None] / (ratios[:, None, lvl, 0] * w)
    points.append(jnp.stack([ref_x, ref_y], axis=-1))
  points = jnp.concatenate(points, axis=1)  # [B, S, 2]
  return points[:, :, None] * ratios[:, None]


def encoder_proposals(token_mask, spatial_shapes):
  """One anchor box per encoder token (DINO gen_encoder_output_proposals).

  Centre ((j + 0.5) / valid_W, (i + 0.5) / valid_H) relative to the real image, w = h =
  0.05 * 2^level. A proposal is usable only if every coordinate is in (0.01, 0.99) and its
  token is real.

  Args:
    token_mask: [B, S] bool, True on real tokens.
    spatial_shapes: static tuple of (H_l, W_l).

  Returns:
    (proposals_unsigmoid [B, S, 4] float32 with +inf where unusable, usable [B, S] bool).
  """
  b = token_mask.shape[0]
  proposals = []
  start = 0
  for lvl, (h, w) in enumerate(spatial_shapes):
    m = token_mask[:, start:start + h * w].reshape(b, h, w)
    start += h * w
    valid_h = jnp.sum(m[:, :, 0], axis=1).astype(jnp.float32)
    valid_w = jnp.sum(m[:, 0, :], axis=1).astype(jnp.float32)
    ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    cx = jnp.asarray(xs.reshape(-1))[None] / jnp.maximum(valid_w, 1)[:, None]
    cy = jnp.asarray(ys.reshape(-1))[None] / jnp.maximum(valid_h, 1)[:, None]
    wh = jnp.full_like(cx, PROPOSAL_WH * 2.0 ** lvl)
    proposals.append(jnp.stack([cx, cy, wh, wh], axis=-1))
  proposals = jnp.concatenate(proposals, axis=1)
  usable = jnp.all((proposals > 0.01) & (proposals < 0.99), axis=-1) & token_mask
  safe = jnp.clip(proposals, 0.01, 0.99)  # keeps the log finite where the result is replaced
  unsig = jnp.log(safe / (1 - safe))
  return jnp.where(usable[..., None], unsig, jnp.inf), usable


QUERY_SELECTION_RULES = ("dino", "valid_only")


def selection_scores(enc_logits, usable, rule):
  """Per-token score whose top-Q gives the queries (two-stage "standard" selection).

  Unusable tokens (padding, anchors with a coordinate outside (0.01, 0.99)) have their memory
  zeroed before the encoder-output head, so they all carry the same constant logit vector, and
  an infinite proposal (their box is sigmoid(inf) = 1).

  * "dino": the max class logit of every token, unusable ones included: they compete in top-k
    with their constant logit exactly as in IDEA-Research/DINO (models/dino/
    deformable_transformer.py, `torch.topk(enc_outputs_class_unselected.max(-1)[0], ...)`),
    Semi-DETR and Co-DETR. A selected unusable token gives a query with reference box
    (1, 1, 1, 1). Tied tokens are interchangeable (same content and box), so which of them
    top-k takes does not change any output. The selection then depends on the amount of
    padding.
  * "valid_only": unusable tokens score -inf, so they are selected only when fewer than Q
    tokens are usable (never at real image sizes); every query starts from a real anchor.

  Args:
    enc_logits: [B, S, C] encoder-output class logits.
    usable: [B, S] bool from `encoder_proposals`.
    rule: one of QUERY_SELECTION_RULES.

  Returns:
    [B, S] float32 scores.
  """
  if rule not in QUERY_SELECTION_RULES:
    raise ValueError(f"query_selection must be one of {QUERY_SELECTION_RULES}, got {rule!r}")
  score = jnp.max(enc_logits, axis=-1).astype(jnp.float32)
  if rule == "valid_only":
    score = jnp.where(usable, score, -jnp.inf)
  return score


class DeformableTransformer(nn.Module):
  """Encoder, mixed query selection, decoder and the (shared) prediction heads.

  Attributes:
    num_classes: C.
    d_model, n_heads, dim_feedforward: transformer sizes.
    num_queries: Q matching queries (top-Q encoder proposals).
    enc_layers, dec_layers: depths.
    n_levels: number of feature levels.
    enc_n_points, dec_n_points: MSDA points per level and head.
    padding_invariant: query positional embedding from the reference box relative to the real
      image instead of DINO's box times the level-0 valid ratio (which depends on padding).
    query_selection: "dino" (unusable tokens compete in top-k, the official rule) or
      "valid_only" (they never do); see `selection_scores`.
    share_decoder_heads: one class Linear and one box MLP for all decoder layers (`class_embed`,
      `bbox_embed`: DINO's dec_pred_*_embed_share) or, False, one pair per layer
      (`class_embed_{i}`, `bbox_embed_{i}`: Co-DETR's cls_branches / reg_branches, whose extra
      encoder-proposal branch is `enc_out_*` here in both cases). Layer i's box MLP both refines
      the reference for layer i+1 and gives layer i's boxes.
    dtype: compute dtype (boxes and logits come back float32).
    msda_implementation: sampling kernel name.
    remat: recompute each encoder/decoder layer in the backward pass (nn.remat), for about
      one extra forward of the transformer. On the CPU it saves no memory: XLA's CPU pipeline
      drops the optimization barriers and runs every layer's recomputation at the start of the
      backward pass (docs/benchmarks.md); GPU/TPU keep the barriers.
    scan_layers: run the encoder and the decoder layers as one `lax.scan` each over their
      parameters stacked at call time, so XLA compiles one layer body instead of `enc_layers`
      + `dec_layers` copies (compile time). The parameter tree is unchanged
      (`encoder_layers_{i}`, `decoder_layers_{i}`: checkpoints and the PyTorch conversion do
      not depend on it) and so are the outputs up to float rounding; `init` always builds the
      layers one by one. On the CPU it compiles faster but steps slower (the while loops'
      copies and lost cross-layer fusion; docs/benchmarks.md), so it is off by default.
  """
  num_classes: int = 91
  d_model: int = 256
  n_heads: int = 8
  dim_feedforward: int = 2048
  num_queries: int = 900
  enc_layers: int = 6
  dec_layers: int = 6
  n_levels: int = 4
  enc_n_points: int = 4
  dec_n_points: int = 4
  padding_invariant: bool = False
  query_selection: str = "dino"
  share_decoder_heads: bool = True
  dtype: Any = jnp.float32
  msda_implementation: str = "gather"
  remat: bool = False
  scan_layers: bool = False

  def setup(self):
    dt = self.dtype
    # spatial_shapes (a tuple) is a static argument of both layer types (self counts as 0).
    encoder_cls = nn.remat(EncoderLayer, static_argnums=(4,)) if self.remat else EncoderLayer
    decoder_cls = nn.remat(DecoderLayer, static_argnums=(5,)) if self.remat else DecoderLayer
    prior_bias = -math.log((1 - 0.01) / 0.01)
    self.level_embed = self.param("level_embed", nn.initializers.normal(1.0),
                                  (self.n_levels, self.d_model), jnp.float32)
    self.encoder_layers = [
        encoder_cls(self.d_model, self.dim_feedforward, self.n_levels, self.n_heads,
                     self.enc_n_points, dt, self.msda_implementation,
                     name=f"encoder_layers_{i}") for i in range(self.enc_layers)]
    self.enc_output = _dense(self.d_model, "enc_output", dt)
    self.enc_output_norm = _layer_norm("enc_output_norm", dt)
    self.enc_out_class_embed = _dense(self.num_classes, "enc_out_class_embed", dt,
                                      bias_init=nn.initializers.constant(prior_bias))
    self.enc_out_bbox_embed = MLP(self.d_model, 4, 3, last_zero_init=True, dtype=dt,
                                  name="enc_out_bbox_embed")
    self.tgt_embed = self.param("tgt_embed", _xavier, (self.num_queries, self.d_model),
                                jnp.float32)
    self.decoder_layers = [
        decoder_cls(self.d_model, self.dim_feedforward, self.n_levels, self.n_heads,
                     self.dec_n_points, dt, self.msda_implementation,
                     name=f"decoder_layers_{i}") for i in range(self.dec_layers)]
    self.decoder_norm = _layer_norm("decoder_norm", dt)
    self.ref_point_head = MLP(self.d_model, self.d_model, 2, dtype=dt, name="ref_point_head")
    # The decoder's class Linear and box MLP: shared by all layers (DINO's
    # dec_pred_*_embed_share) or one per layer (Co-DETR), each initialised the same way.
    class_head = lambda name: _dense(self.num_classes, name, dt,
                                     bias_init=nn.initializers.constant(prior_bias))
    box_head = lambda name: MLP(self.d_model, 4, 3, last_zero_init=True, dtype=dt, name=name)
    if self.share_decoder_heads:
      self.class_embed = class_head("class_embed")
      self.bbox_embed = box_head("bbox_embed")
    else:
      self.class_embeds = [class_head(f"class_embed_{i}") for i in range(self.dec_layers)]
      self.bbox_embeds = [box_head(f"bbox_embed_{i}") for i in range(self.dec_layers)]

  def _heads(self, layer):
    """(class Linear, box MLP) of decoder layer `layer`."""
    if self.share_decoder_heads:
      return self.class_embed, self.bbox_embed
    return self.class_embeds[layer], self.bbox_embeds[layer]

  def _box(self, hidden, reference, layer):
    """Decoder layer `layer`'s boxes (`_refined_box` with its box MLP), float32 [.., 4]."""
    return _refined_box(self._heads(layer)[1], hidden, reference)

  def _decoder_step(self, layer, query_head, box_mlp, hidden, reference, ratios4, layer_args):
    """One refining decoder layer, for the unrolled loop and the scan body alike.

    Args:
      layer, query_head, box_mlp: callables (bound modules, or params-applied unbound ones in
        the scan): the decoder layer, `ref_point_head` and the layer's box MLP.
      hidden: [B, T, C]; reference: [B, T, 4] detached normalised cxcywh boxes.
      ratios4: [B, L, 4] valid ratios; layer_args: the layer's remaining arguments (memory,
        spatial shapes, token mask, self-attention mask).

    Returns:
      (hidden [B, T, C], undetached refined boxes [B, T, 4]).
    """
    ref_input = reference[:, :, None, :] * ratios4[:, None]  # [B, T, L, 4]
    sine_source = reference if self.padding_invariant else ref_input[:, :, 0]
    query_pos = query_head(
        sine_embedding_of_boxes(sine_source, num_pos_feats=self.d_model // 2).astype(
            self.dtype))
    hidden = layer(hidden, query_pos, ref_input, *layer_args)
    return hidden, _refined_box(box_mlp, hidden, reference)

  def encode(self, srcs, masks, pos_embeds):
    """Runs the deformable encoder.

    Args:
      srcs: list of L maps [B, H_l, W_l, C] (projected features).
      masks: list of L [B, H_l, W_l] bool, True on real pixels.
      pos_embeds: list of L [B, H_l, W_l, C] sine position embeddings.

    Returns:
      memory: [B, S, C] encoder output over the S = sum H_l * W_l tokens (level-major,
      row-major), in the compute dtype.
    """
    if len(srcs) != self.n_levels:
      raise ValueError(f"DeformableTransformer: got {len(srcs)} levels, expected "
                       f"{self.n_levels}")
    b = srcs[0].shape[0]
    spatial_shapes = _spatial_shapes(masks)
    flat = lambda x: x.reshape(b, -1, x.shape[-1])
    src = jnp.concatenate([flat(s) for s in srcs], axis=1).astype(self.dtype)  # [B, S, C]
    token_mask = _token_mask(masks)
    pos = jnp.concatenate([flat(p) + self.level_embed[lvl] for lvl, p in enumerate(pos_embeds)],
                          axis=1).astype(self.dtype)
    ref_enc = encoder_reference_points(spatial_shapes, valid_ratios(masks))
    if self._scanned(self.encoder_layers):
      layer_fn = _unbound(self.encoder_layers[0])

      def body(memory, params):
        return layer_fn(params, memory, pos, ref_enc, spatial_shapes, token_mask), None

      return jax.lax.scan(body, src, _stacked_params(self.encoder_layers))[0]
    memory = src
    for layer in self.encoder_layers:
      memory = layer(memory, pos, ref_enc, spatial_shapes, token_mask)
    return memory

  def _scanned(self, layers):
    """Whether `layers` run as one lax.scan (see `scan_layers`)."""
    return self.scan_layers and len(layers) > 1 and not self.is_initializing()

  def decode(self, memory, masks, prefix_content=None, prefix_reference=None,
             self_attn_blocked=None):
    """Mixed query selection and the refining decoder.

    Args:
      memory: [B, S, C] from `encode`.
      masks: list of L [B, H_l, W_l] bool, True on real pixels (gives the level shapes).
      prefix_content: optional [B, P, C] content of extra slots placed before the matching
        queries (denoising and other query groups).
      prefix_reference: optional [B, P, 4] their reference boxes, unsigmoided cxcywh.
      self_attn_blocked: optional [B, P + Q, P + Q] bool decoder self-attention mask.

    Returns:
      dict with `logits` [n_dec, B, P + Q, C], `boxes` [n_dec, B, P + Q, 4] (normalised
      cxcywh) and `hidden` [n_dec, B, P + Q, C] (decoder-normed states) for every decoder
      layer, and `interm_logits` [B, Q, C], `interm_boxes` [B, Q, 4] for the selected encoder
      proposals. All float32 except `hidden` (compute dtype).
    """
    b = memory.shape[0]
    spatial_shapes = _spatial_shapes(masks)
    num_tokens = sum(h * w for h, w in spatial_shapes)
    if self.num_queries > num_tokens:
      raise ValueError(f"DeformableTransformer: num_queries {self.num_queries} > encoder "
                       f"tokens {num_tokens} (image too small for the config)")
    token_mask = _token_mask(masks)
    ratios = valid_ratios(masks)  # [B, L, 2]

    # Mixed query selection (two_stage_type "standard").
    proposals, usable = encoder_proposals(token_mask, spatial_shapes)
    out_memory = jnp.where(usable[..., None], memory, 0)
    out_memory = self.enc_output_norm(self.enc_output(out_memory))
    enc_logits = self.enc_out_class_embed(out_memory).astype(jnp.float32)  # [B, S, C]
    enc_coord = self.enc_out_bbox_embed(out_memory).astype(jnp.float32) + proposals
    score = selection_scores(enc_logits, usable, self.query_selection)
    _, topk = jax.lax.top_k(score, self.num_queries)  # [B, Q]
    take = lambda x: jnp.take_along_axis(x, topk[..., None], axis=1)
    ref_undetached = take(enc_coord)  # [B, Q, 4] unsigmoided
    interm_logits = take(enc_logits)
    interm_boxes = jax.nn.sigmoid(ref_undetached)
    reference_unsig = jax.lax.stop_gradient(ref_undetached)
    tgt = jnp.broadcast_to(self.tgt_embed.astype(self.dtype)[None],
                           (b, self.num_queries, self.d_model))
    if prefix_content is not None:
      tgt = jnp.concatenate([prefix_content.astype(self.dtype), tgt], axis=1)
      reference_unsig = jnp.concatenate([prefix_reference.astype(jnp.float32), reference_unsig],
                                        axis=1)

    # Decoder with iterative refinement and look-forward-twice.
    reference = jax.nn.sigmoid(reference_unsig)  # [B, T, 4]
    ratios4 = jnp.concatenate([ratios, ratios], axis=-1)  # [B, L, 4]
    if self._scanned(self.decoder_layers):
      return dict(self._scan_decoder(tgt, reference, ratios4, memory, spatial_shapes,
                                     token_mask, self_attn_blocked),
                  interm_logits=interm_logits, interm_boxes=interm_boxes)
    hidden = tgt
    references = [reference]
    normed = []
    layer_args = (memory, spatial_shapes, token_mask, self_attn_blocked)
    for i, layer in enumerate(self.decoder_layers):
      hidden, new_reference = self._decoder_step(layer, self.ref_point_head, self._heads(i)[1],
                                                 hidden, reference, ratios4, layer_args)
      references.append(new_reference)
      reference = jax.lax.stop_gradient(new_reference)
      normed.append(self.decoder_norm(hidden))
    logits = jnp.stack([self._heads(i)[0](h).astype(jnp.float32) for i, h in enumerate(normed)])
    boxes = jnp.stack([self._box(h, references[i], i) for i, h in enumerate(normed)])
    return {"logits": logits, "boxes": boxes, "hidden": jnp.stack(normed),
            "interm_logits": interm_logits, "interm_boxes": interm_boxes}

  def __call__(self, srcs, masks, pos_embeds, prefix_content=None, prefix_reference=None,
               self_attn_blocked=None):
    """`decode(encode(srcs, masks, pos_embeds), masks, ...)`; see both."""
    return self.decode(self.encode(srcs, masks, pos_embeds), masks, prefix_content,
                       prefix_reference, self_attn_blocked)

  def _scan_decoder(self, tgt, reference, ratios4, memory, spatial_shapes, token_mask,
                    self_attn_blocked):
    """The decoder loop of `decode` as one lax.scan over the stacked layer parameters.

    Same computation as the unrolled loop: carry (hidden [B, T, C], detached reference
    [B, T, 4]); each step emits the decoder-normed state and the undetached refined box, from
    which the heads then give every layer's logits and boxes at once (shared heads) or per
    layer (`share_decoder_heads=False`: the box MLP of each layer also travels in the scan).

    Returns:
      dict with `logits`, `boxes`, `hidden` as in `decode`.
    """
    layer_fn = _unbound(self.decoder_layers[0])
    ref_head_fn, ref_head_params = _unbound(self.ref_point_head), _params(self.ref_point_head)
    norm_fn, norm_params = _unbound(self.decoder_norm), _params(self.decoder_norm)
    if self.share_decoder_heads:
      box_fn, box_params = _unbound(self.bbox_embed), _params(self.bbox_embed)
      xs = _stacked_params(self.decoder_layers)
    else:
      box_fn, box_params = _unbound(self.bbox_embeds[0]), None
      xs = (_stacked_params(self.decoder_layers), _stacked_params(self.bbox_embeds))

    layer_args = (memory, spatial_shapes, token_mask, self_attn_blocked)

    def body(carry, step_params):
      hidden, reference = carry
      layer_params, step_box_params = ((step_params, box_params) if self.share_decoder_heads
                                       else step_params)
      hidden, new_reference = self._decoder_step(
          functools.partial(layer_fn, layer_params),
          functools.partial(ref_head_fn, ref_head_params),
          functools.partial(box_fn, step_box_params), hidden, reference, ratios4, layer_args)
      carry = (hidden, jax.lax.stop_gradient(new_reference))
      return carry, (norm_fn(norm_params, hidden), new_reference)

    _, (normed, refined) = jax.lax.scan(body, (tgt, reference), xs)
    # Layer i's boxes refine the undetached box of layer i - 1 (look-forward-twice).
    previous = jnp.concatenate([reference[None], refined[:-1]], axis=0)
    if self.share_decoder_heads:
      logits = self.class_embed(normed).astype(jnp.float32)
      boxes = self._box(normed, previous, 0)
    else:
      logits = jnp.stack([self._heads(i)[0](h).astype(jnp.float32)
                          for i, h in enumerate(normed)])
      boxes = jnp.stack([self._box(h, previous[i], i) for i, h in enumerate(normed)])
    return {"logits": logits, "boxes": boxes, "hidden": normed}


def _refined_box(box_mlp, hidden, reference):
  """sigmoid(box_mlp(hidden) + inverse_sigmoid(reference)), float32 [.., 4]."""
  return jax.nn.sigmoid(box_mlp(hidden).astype(jnp.float32) + inverse_sigmoid(reference))


def _params(module):
  """A bound module's params."""
  return module.variables["params"]


def _unbound(module):
  """A bound module's computation as a pure function f(params, *args), for lax.scan bodies.

  The module's own definition (an nn.remat-wrapped layer stays wrapped) applied to the params
  given instead of its bound ones.
  """
  definition = module.unbind()[0]
  return lambda params, *args: definition.apply({"params": params}, *args)


def _stacked_params(modules):
  """The params of same-structured bound modules, stacked along a new leading axis."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *[_params(m) for m in modules])


def _spatial_shapes(masks):
  """Static ((H_l, W_l), ...) of the level masks."""
  return tuple((int(m.shape[1]), int(m.shape[2])) for m in masks)


def _token_mask(masks):
  """[B, S] bool over the flattened levels."""
  b = masks[0].shape[0]
  return jnp.concatenate([m.reshape(b, -1) for m in masks], axis=1)
