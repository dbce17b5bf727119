"""The spec: the single description of a (compressed) timm-style ViT.

Every compression method outputs a ViTSpec plus weights; the engine, the reference
module and the MACs count only ever read a spec. The format is a project-wide
contract (docs/ARCHITECTURE.md, "The spec contract"): field names and meanings must not drift.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass
from pathlib import Path

from .errors import SpecError, is_int
from .jsonfile import load_json_file, parse_json
from .kernels.merge_rules import ATME_AXES, atme_merged_grid, tome_mergeable

SPEC_VERSION = 2
# versions this dcvit_engine reads; a version-1 spec is a version-2 spec without the v2 fields
READABLE_VERSIONS = (1, 2)
SPEC_FILENAME = "spec.json"  # name of the spec inside an artifact folder

GLOBAL_POOLS = ("token", "avg", "map", "")
MERGE_KINDS = ("tome", "atme")
# MLP activations: exact GELU, GELU's tanh approximation, QuickGELU x*sigmoid(1.702x), SiLU
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "silu")
# timm RotaryEmbeddingCat (in_pixels=False), RotaryEmbeddingDinoV3, RotaryEmbeddingMixed
ROPE_KINDS = ("cat", "dinov3", "mixed")
GRID_INDEXINGS = ("ij", "xy")
NORMALIZE_COORDS = ("separate", "min", "max")
LATENT_POOLS = ("token", "avg", "")


def _fail(where: str, message: str) -> None:
    raise SpecError(f"invalid spec: {where}: {message}")


def _check_int(where: str, value, minimum: int) -> None:
    # bool is an int subclass; a True width is always a bug in the producer
    if not is_int(value):
        _fail(where, f"expected an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        _fail(where, f"must be >= {minimum}, got {value}")


def _check_bool(where: str, value) -> None:
    if not isinstance(value, bool):
        _fail(where, f"expected true/false, got {value!r} ({type(value).__name__})")


def _check_number(where: str, value, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        _fail(where, f"expected a {'positive ' if positive else ''}finite number, got {value!r}")


def _check_choice(where: str, value, choices) -> None:
    if value not in choices:
        _fail(where, f"expected one of {choices}, got {value!r}")


def _version_error(version) -> SpecError:
    return SpecError(f"invalid spec: version: unsupported spec version {version!r}; this dcvit_engine "
                      f"reads versions {', '.join(map(str, READABLE_VERSIONS))} (upgrade dcvit_engine "
                      "or re-export the model)")


# the fields version 2 added, per dataclass (left out of to_dict at their defaults)
V2_FIELDS = ("reg_tokens", "abs_pos_embed", "rope", "attn_pool")
V2_BLOCK_FIELDS = ("mlp_act", "mlp_gated", "mlp_inner_norm")
V2_ATTENTION_FIELDS = ("inner_norm",)


def _drop_defaults(data: dict, cls, names) -> None:
    for name in names:
        if data[name] == cls.__dataclass_fields__[name].default:
            del data[name]


def _check_keys(where: str, data, cls) -> None:
    if not isinstance(data, dict):
        _fail(where, f"expected an object, got {type(data).__name__}")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        _fail(where, f"unknown field(s) {unknown}; known fields are {sorted(known)}")
    required = {n for n, f in cls.__dataclass_fields__.items()
                if f.default is MISSING and f.default_factory is MISSING}
    missing = sorted(required - set(data))
    if missing:
        _fail(where, f"missing field(s) {missing}")


@dataclass
class AttentionSpec:
    """Multi-head self-attention of one block, described per KEPT head."""
    qk_dims: list[int]   # per kept head: q/k width d_h
    v_dims: list[int]    # per kept head: v width e_h
    scale: float         # softmax scale; the teacher's head_dim ** -0.5, kept after channel pruning
    qkv_bias: bool = True
    proj_bias: bool = True
    qk_norm: bool = False  # timm q_norm/k_norm: LayerNorm over head_dim, shared by all heads
    inner_norm: bool = False  # timm attn.norm (scale_norm): LayerNorm over the v_total outputs, before proj

    @property
    def num_heads(self) -> int:
        return len(self.qk_dims)

    @property
    def qk_total(self) -> int:
        return sum(self.qk_dims)

    @property
    def v_total(self) -> int:
        return sum(self.v_dims)

    @property
    def qkv_out(self) -> int:
        return 2 * self.qk_total + self.v_total

    def validate(self, where: str = "attn") -> None:
        for name in ("qk_dims", "v_dims"):
            dims = getattr(self, name)
            if not isinstance(dims, (list, tuple)) or len(dims) == 0:
                _fail(f"{where}.{name}", "expected a non-empty list of per-head widths "
                      "(use attn = null to remove the attention branch)")
            for h, d in enumerate(dims):
                _check_int(f"{where}.{name}[{h}]", d, 1)
        if len(self.qk_dims) != len(self.v_dims):
            _fail(where, f"qk_dims has {len(self.qk_dims)} heads but v_dims has {len(self.v_dims)}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) \
                or not math.isfinite(self.scale) or self.scale <= 0:
            _fail(f"{where}.scale", f"expected a positive finite number, got {self.scale!r}")
        for name in ("qkv_bias", "proj_bias", "qk_norm", "inner_norm"):
            _check_bool(f"{where}.{name}", getattr(self, name))
        if self.qk_norm:
            # q_norm/k_norm hold one weight of size head_dim shared by all heads, so every
            # head must keep the teacher's full width (the one the scale was derived from)
            teacher_dim = round(self.scale ** -2)
            if any(d != teacher_dim for d in self.qk_dims):
                _fail(f"{where}.qk_dims", f"qk_norm needs every head at the teacher head_dim "
                      f"{teacher_dim} (= scale**-2), got {list(self.qk_dims)}")


@dataclass
class MergeSpec:
    """Token merging, applied after the attention residual and before the MLP."""
    kind: str            # "tome" | "atme"
    r: int = 0           # tome: number of tokens removed
    axis: str = ""       # atme: "w" -> H x ceil(W/2); "h" -> ceil(H/2) x W

    def validate(self, where: str = "merge") -> None:
        if self.kind not in MERGE_KINDS:
            _fail(f"{where}.kind", f"expected one of {MERGE_KINDS}, got {self.kind!r}")
        _check_int(f"{where}.r", self.r, 0)
        if self.kind == "tome":
            if self.axis != "":
                _fail(f"{where}.axis", f"tome merges take no axis, got {self.axis!r}")
            if self.r < 1:
                _fail(f"{where}.r", "a tome merge must remove at least 1 token (use merge = null instead)")
        else:
            if self.axis not in ATME_AXES:
                _fail(f"{where}.axis", f"atme needs axis 'w' or 'h', got {self.axis!r}")
            if self.r != 0:
                _fail(f"{where}.r", f"atme removes tokens by halving an axis; r must be 0, got {self.r}")


@dataclass
class BlockSpec:
    """One transformer block: x += ls1*attn(norm1(x)); [merge]; x += ls2*mlp(norm2(x)).

    The MLP is fc2([mlp.norm](act(fc1(x)))), or gated fc2([mlp.norm](act(g) * v)) where fc1's
    rows are [g_0 .. g_{h-1} | v_0 .. v_{h-1}] (timm GluMlp gate_last=False / SwiGLU's fc1_g, fc1_x)."""
    attn: AttentionSpec | None   # None = attention branch (and norm1, ls1) removed
    mlp_hidden: int              # 0 = MLP branch (and norm2, ls2) removed; gated: the product width
    layer_scale: bool = False    # ls1.gamma / ls2.gamma present (timm LayerScale)
    merge: MergeSpec | None = None
    mlp_act: str = "gelu"        # one of ACTIVATIONS
    mlp_gated: bool = False      # fc1 holds 2 * mlp_hidden rows: gate half, then value half
    mlp_inner_norm: bool = False  # timm mlp.norm: LayerNorm over mlp_hidden before fc2

    def validate(self, where: str = "block") -> None:
        if self.attn is not None:
            if not isinstance(self.attn, AttentionSpec):
                _fail(f"{where}.attn", f"expected AttentionSpec or None, got {type(self.attn).__name__}")
            self.attn.validate(f"{where}.attn")
        _check_int(f"{where}.mlp_hidden", self.mlp_hidden, 0)
        _check_bool(f"{where}.layer_scale", self.layer_scale)
        _check_choice(f"{where}.mlp_act", self.mlp_act, ACTIVATIONS)
        _check_bool(f"{where}.mlp_gated", self.mlp_gated)
        _check_bool(f"{where}.mlp_inner_norm", self.mlp_inner_norm)
        if self.merge is not None:
            if not isinstance(self.merge, MergeSpec):
                _fail(f"{where}.merge", f"expected MergeSpec or None, got {type(self.merge).__name__}")
            self.merge.validate(f"{where}.merge")


@dataclass
class RopeSpec:
    """Rotary position embedding of q and k in every attention, as timm computes it.

    Patch token p at grid row r, column c is rotated by angles from the spec's patch grid;
    prefix tokens are never rotated (timm's num_prefix_tokens skip). The frequencies,
    coordinates and the rotation layout are timm's: `rope.rope_tables` computes them."""
    kind: str                 # "cat": RotaryEmbeddingCat (index grid, temperature bands); "dinov3";
                              # "mixed": learned frequencies per block and head, weights
                              # blocks.i.attn.rope_freqs (2, heads, dim // 2): x-axis, then y-axis
    dim: int                  # rotated width per head (timm: head_dim), a multiple of 4
    temperature: float        # cat: bands 1/t**(i/(dim/4)); dinov3: periods t**(2i/(dim/2)), unused
                              # when min_period/max_period give the periods; mixed: timm's init only
    rotate_half: bool         # True: channel i pairs with i + dim/2; False: interleaved (2i, 2i+1)
    grid_indexing: str = "ij"  # "xy" swaps the coordinate channels (x first), as timm
    grid_offset: float = 0.0
    ref_feat_shape: list[int] | None = None  # cat: EVA's rescale of positions to this grid
    normalize_coords: str = "separate"       # dinov3: denominator of the centered coordinates
    min_period: float | None = None          # dinov3: periods from min/max instead of temperature
    max_period: float | None = None

    def validate(self, where: str = "rope") -> None:
        _check_choice(f"{where}.kind", self.kind, ROPE_KINDS)
        _check_int(f"{where}.dim", self.dim, 4)
        if self.dim % 4:
            _fail(f"{where}.dim", f"must be a multiple of 4 (two axes of sin/cos pairs), got {self.dim}")
        _check_number(f"{where}.temperature", self.temperature, positive=True)
        _check_bool(f"{where}.rotate_half", self.rotate_half)
        _check_choice(f"{where}.grid_indexing", self.grid_indexing, GRID_INDEXINGS)
        _check_number(f"{where}.grid_offset", self.grid_offset)
        _check_choice(f"{where}.normalize_coords", self.normalize_coords, NORMALIZE_COORDS)
        if self.ref_feat_shape is not None:
            if self.kind != "cat":
                _fail(f"{where}.ref_feat_shape", "only the 'cat' kind rescales to a reference grid")
            if not isinstance(self.ref_feat_shape, (list, tuple)) or len(self.ref_feat_shape) != 2:
                _fail(f"{where}.ref_feat_shape", f"expected [rows, cols], got {self.ref_feat_shape!r}")
            for s in self.ref_feat_shape:
                _check_int(f"{where}.ref_feat_shape", s, 1)
        if self.kind == "mixed" and (self.rotate_half or self.grid_offset or self.ref_feat_shape):
            _fail(f"{where}.kind", "mixed RoPE (timm RotaryEmbeddingMixed) rotates interleaved pairs on "
                  "the plain index grid: rotate_half false, no grid_offset, no ref_feat_shape")
        if (self.min_period is None) != (self.max_period is None):
            _fail(f"{where}.min_period", "min_period and max_period go together")
        if self.min_period is not None:
            if self.kind != "dinov3":
                _fail(f"{where}.min_period", "only the 'dinov3' kind takes periods")
            _check_number(f"{where}.min_period", self.min_period, positive=True)
            _check_number(f"{where}.max_period", self.max_period, positive=True)


@dataclass
class AttnPoolSpec:
    """timm AttentionPoolLatent (global_pool 'map'): learned latent queries attend over the
    final tokens, then x = proj(attn); x += mlp(norm(x)); pool over the latents. Weights under
    attn_pool.* with timm's names (latent, q, kv, [q_norm, k_norm], proj, norm, mlp.fc1, mlp.fc2)."""
    num_heads: int
    mlp_hidden: int
    latent_len: int = 1
    qkv_bias: bool = True
    qk_norm: bool = False
    mlp_act: str = "gelu"
    include_prefix: bool = False  # timm VisionTransformer: patch tokens only; Eva: every token
    pool: str = "token"           # over the latents: first, mean, or all ("")

    def validate(self, embed_dim: int, where: str = "attn_pool") -> None:
        _check_int(f"{where}.num_heads", self.num_heads, 1)
        if embed_dim % self.num_heads:
            _fail(f"{where}.num_heads", f"{self.num_heads} heads do not divide embed_dim {embed_dim}")
        _check_int(f"{where}.mlp_hidden", self.mlp_hidden, 1)
        _check_int(f"{where}.latent_len", self.latent_len, 1)
        for name in ("qkv_bias", "qk_norm", "include_prefix"):
            _check_bool(f"{where}.{name}", getattr(self, name))
        _check_choice(f"{where}.mlp_act", self.mlp_act, ACTIVATIONS)
        _check_choice(f"{where}.pool", self.pool, LATENT_POOLS)


@dataclass
class ViTSpec:
    img_size: tuple[int, int]
    patch_size: int
    in_chans: int
    embed_dim: int
    num_classes: int          # 0 = no head (forward returns pooled features, as timm)
    class_token: bool
    dist_token: bool          # deit *_distilled: dist_token and head_dist
    global_pool: str          # "token" | "avg" | ""  (timm semantics)
    fc_norm: bool             # timm fc_norm (used with avg pooling) instead of final norm
    pre_norm: bool            # timm norm_pre (and, as in timm, no patch-embedding bias)
    final_norm: bool          # timm norm
    no_embed_class: bool      # pos_embed excludes prefix tokens
    norm_eps: float           # LayerNorm eps (timm ViT: 1e-6)
    prop_attn: bool           # proportional attention: + log(size) per key after merges
    blocks: list[BlockSpec]
    version: int = SPEC_VERSION
    # version 2 (defaults = the version-1 model)
    reg_tokens: int = 0       # timm register tokens (reg_token), after the class / dist tokens
    abs_pos_embed: bool = True  # learned absolute pos_embed present (timm pos_embed not None)
    rope: RopeSpec | None = None      # rotary position embedding in every attention
    attn_pool: AttnPoolSpec | None = None  # the 'map' head; present exactly when global_pool == 'map'

    # ---- derived geometry -------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, cols); like timm's PatchEmbed, a remainder is dropped."""
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches, in order: class, distillation, registers. Never merged,
        pruned or rotated."""
        return int(self.class_token) + int(self.dist_token) + self.reg_tokens

    @property
    def depth(self) -> int:
        return len(self.blocks)

    # ---- validation ---------------------------------------------------------------
    def validate(self) -> "ViTSpec":
        """Raise ValueError naming the first bad field; return self for chaining."""
        if self.version != SPEC_VERSION:
            raise _version_error(self.version)
        if not isinstance(self.img_size, (tuple, list)) or len(self.img_size) != 2:
            _fail("img_size", f"expected [height, width], got {self.img_size!r}")
        for axis, s in zip(("height", "width"), self.img_size):
            _check_int(f"img_size ({axis})", s, 1)
        _check_int("patch_size", self.patch_size, 1)
        if min(self.img_size) < self.patch_size:
            _fail("patch_size", f"patch {self.patch_size} is larger than the image {tuple(self.img_size)}")
        _check_int("in_chans", self.in_chans, 1)
        _check_int("embed_dim", self.embed_dim, 1)
        _check_int("num_classes", self.num_classes, 0)
        for name in ("class_token", "dist_token", "fc_norm", "pre_norm", "final_norm",
                     "no_embed_class", "prop_attn"):
            _check_bool(name, getattr(self, name))
        if self.global_pool not in GLOBAL_POOLS:
            _fail("global_pool", f"expected one of {GLOBAL_POOLS}, got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            _fail("global_pool", "'token' pooling needs class_token = true")
        _check_int("reg_tokens", self.reg_tokens, 0)
        _check_bool("abs_pos_embed", self.abs_pos_embed)
        if self.reg_tokens and self.dist_token:
            _fail("reg_tokens", "register tokens with a distillation token is no timm layout")
        if (self.global_pool == "map") != (self.attn_pool is not None):
            _fail("attn_pool", "an attention-pool head goes with global_pool = 'map' and only with it")
        if self.attn_pool is not None:
            if not isinstance(self.attn_pool, AttnPoolSpec):
                _fail("attn_pool", f"expected AttnPoolSpec or None, got {type(self.attn_pool).__name__}")
            self.attn_pool.validate(self.embed_dim)
        if self.dist_token:
            if not self.class_token:
                _fail("dist_token", "a distillation token needs class_token = true (DeiT layout)")
            if self.global_pool != "token" or self.fc_norm:
                _fail("dist_token", "the distilled head reads the class and distillation tokens: "
                      "needs global_pool = 'token' and fc_norm = false")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) \
                or not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            _fail("norm_eps", f"expected a positive number, got {self.norm_eps!r}")
        if not isinstance(self.blocks, (list, tuple)):
            _fail("blocks", f"expected a list, got {type(self.blocks).__name__}")
        for i, block in enumerate(self.blocks):
            if not isinstance(block, BlockSpec):
                _fail(f"blocks[{i}]", f"expected BlockSpec, got {type(block).__name__}")
            block.validate(f"blocks[{i}]")
        if self.rope is not None:
            self._validate_rope()
        _check_limits(self)  # before anything allocates: a hostile spec must not exhaust memory
        merge_schedule(self)  # raises on merges the token count cannot support
        return self

    def _validate_rope(self) -> None:
        if not isinstance(self.rope, RopeSpec):
            _fail("rope", f"expected RopeSpec or None, got {type(self.rope).__name__}")
        self.rope.validate()
        for i, block in enumerate(self.blocks):
            # rotation pairs span the whole head width, so q/k heads stay whole (v may shrink)
            if block.attn is not None and any(d != self.rope.dim for d in block.attn.qk_dims):
                _fail(f"blocks[{i}].attn.qk_dims", f"RoPE rotates whole heads of width {self.rope.dim}, "
                      f"got {list(block.attn.qk_dims)}")
            if block.merge is not None:
                _fail(f"blocks[{i}].merge", "token merging with RoPE is not supported yet (a merged "
                      "token's rotary position is not defined)")

    # ---- (de)serialisation --------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain data for JSON. Version-2 fields at their defaults are left out: a version-1
        dcvit_engine checks field names before the version, so it then reads a spec that uses
        no version-2 feature as 'unsupported spec version 2', and one that does as an unknown
        field naming the feature (never as a shape error)."""
        data = asdict(self)  # nested specs become plain dicts
        data["version"] = self.version
        data["img_size"] = list(self.img_size)
        data["norm_eps"] = float(self.norm_eps)
        for block in data["blocks"]:
            if block["attn"] is not None:
                block["attn"]["scale"] = float(block["attn"]["scale"])
                block["attn"]["qk_dims"] = list(block["attn"]["qk_dims"])
                block["attn"]["v_dims"] = list(block["attn"]["v_dims"])
        if data["rope"] is not None and data["rope"]["ref_feat_shape"] is not None:
            data["rope"]["ref_feat_shape"] = list(data["rope"]["ref_feat_shape"])
        _drop_defaults(data, ViTSpec, V2_FIELDS)
        for block in data["blocks"]:
            _drop_defaults(block, BlockSpec, V2_BLOCK_FIELDS)
            if block["attn"] is not None:
                _drop_defaults(block["attn"], AttentionSpec, V2_ATTENTION_FIELDS)
        return {"version": data.pop("version"), **data}

    @classmethod
    def from_dict(cls, data: dict) -> "ViTSpec":
        """Build and validate a spec from plain data (e.g. parsed JSON); a version-1 spec is
        read as version 2 with the v2 fields at their defaults."""
        if not isinstance(data, dict):
            _fail("spec", f"expected an object, got {type(data).__name__}")
        # check the version first: a newer format may not even have today's fields
        version = data.get("version", SPEC_VERSION)
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise _version_error(version)
        _check_keys("spec", data, cls)
        if not isinstance(data["blocks"], list):
            _fail("blocks", f"expected a list, got {type(data['blocks']).__name__}")
        blocks = []
        for i, bd in enumerate(data["blocks"]):
            where = f"blocks[{i}]"
            _check_keys(where, bd, BlockSpec)
            fields = dict(bd)
            if fields.get("attn") is not None:
                _check_keys(f"{where}.attn", fields["attn"], AttentionSpec)
                fields["attn"] = AttentionSpec(**fields["attn"])
            if fields.get("merge") is not None:
                _check_keys(f"{where}.merge", fields["merge"], MergeSpec)
                fields["merge"] = MergeSpec(**fields["merge"])
            blocks.append(BlockSpec(**fields))
        fields = {k: v for k, v in data.items() if k != "blocks"}
        fields["version"] = SPEC_VERSION
        if isinstance(fields["img_size"], list):
            fields["img_size"] = tuple(fields["img_size"])
        for name, part in (("rope", RopeSpec), ("attn_pool", AttnPoolSpec)):
            if fields.get(name) is not None:
                _check_keys(name, fields[name], part)
                fields[name] = part(**fields[name])
        return cls(blocks=blocks, **fields).validate()

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "ViTSpec":
        return cls.from_dict(parse_json(text, "spec"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ViTSpec":
        """Read a spec from a JSON file or from an artifact folder holding spec.json."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no spec at {path}: expected a spec JSON file or an "
                                    f"artifact folder containing {SPEC_FILENAME}")
        file = path / SPEC_FILENAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{path} is a folder without {SPEC_FILENAME}; "
                                    "is it a dcvit_engine artifact (written by dcvit_engine.save)?")
        data = load_json_file(file, hint="the artifact is corrupt, re-save the model")
        try:
            return cls.from_dict(data)
        except SpecError as err:
            raise SpecError(f"{file}: {err}") from None


# ---- features of version 2 -------------------------------------------------------
def v2_features(spec: ViTSpec) -> list[str]:
    """The version-2 features `spec` uses, one readable name each (empty for a spec that version
    1 could describe): what a reader that predates version 2 would miss."""
    found = []
    if spec.reg_tokens:
        found.append(f"{spec.reg_tokens} register tokens (reg_tokens)")
    if not spec.abs_pos_embed:
        found.append("no absolute position embedding (abs_pos_embed = false)")
    if spec.rope is not None:
        found.append(f"rotary position embedding (rope, kind {spec.rope.kind!r})")
    if spec.attn_pool is not None:
        found.append("the attention-pool head (global_pool 'map', attn_pool)")
    for i, block in enumerate(spec.blocks):
        if block.mlp_hidden and block.mlp_act != "gelu":
            found.append(f"MLP activation {block.mlp_act!r} (blocks[{i}].mlp_act)")
        if block.mlp_hidden and block.mlp_gated:
            found.append(f"a gated MLP (blocks[{i}].mlp_gated)")
        if block.mlp_hidden and block.mlp_inner_norm:
            found.append(f"the MLP inner norm (blocks[{i}].mlp_inner_norm)")
        if block.attn is not None and block.attn.inner_norm:
            found.append(f"the attention inner norm (blocks[{i}].attn.inner_norm)")
    return found


# ---- token schedule --------------------------------------------------------------
def merge_schedule(spec: ViTSpec) -> list[tuple[int, int, tuple[int, int] | None]]:
    """Per block: (tokens entering, tokens after its merge, patch grid entering or None).

    The grid is None once a ToMe merge has broken the 2-D layout. ToMe removes r
    tokens but, like the ToMe reference, can merge at most (tokens - prefix) // 2
    (prefix tokens are protected); ATME halves one grid axis with ceil and keeps the
    prefix tokens. A merge the token count cannot support raises ValueError.
    """
    prefix = spec.num_prefix_tokens
    grid: tuple[int, int] | None = spec.grid
    tokens = prefix + spec.num_patches
    schedule = []
    for i, block in enumerate(spec.blocks):
        entering, grid_in = tokens, grid
        merge = block.merge
        if merge is not None and merge.kind == "tome":
            mergeable = tome_mergeable(tokens, prefix)
            if merge.r > mergeable:
                _fail(f"blocks[{i}].merge.r", f"ToMe can remove at most {mergeable} of the "
                      f"{tokens} tokens entering this block, got r = {merge.r}")
            tokens -= merge.r
            grid = None
        elif merge is not None:  # atme
            if grid is None:
                _fail(f"blocks[{i}].merge", "ATME needs the 2-D token grid, but an earlier "
                      "ToMe merge already broke it")
            rows, cols = grid
            if (cols if merge.axis == "w" else rows) < 2:
                _fail(f"blocks[{i}].merge.axis", f"cannot halve axis {merge.axis!r} of grid {grid}")
            grid = atme_merged_grid(grid, merge.axis)
            tokens = prefix + grid[0] * grid[1]
        schedule.append((entering, tokens, grid_in))
    return schedule


def tokens_per_block(spec: ViTSpec) -> list[int]:
    """Token count entering each block, after the merges of earlier blocks."""
    return [entering for entering, _, _ in merge_schedule(spec)]


def final_tokens(spec: ViTSpec) -> int:
    """Token count leaving the last block (what the final norm and the head see)."""
    schedule = merge_schedule(spec)
    return schedule[-1][1] if schedule else spec.num_prefix_tokens + spec.num_patches


# ---- size limits -----------------------------------------------------------------
# Far above any ViT the engine targets (ViT-22B: width 6144, MLP 24576, 48 blocks), low
# enough that a mistyped or hostile spec fails here, naming the field, not inside torch.
DIMENSION_LIMITS = {"img_size": 8192, "in_chans": 64, "embed_dim": 16384, "num_classes": 1_000_000,
                    "depth": 1024, "heads": 1024, "head_dim": 4096, "mlp_hidden": 131072}
MAX_TOKENS = 65536
MAX_PARAMETERS = 2**35  # 128 GiB in float32


def _check_limits(spec: "ViTSpec") -> None:
    for axis, size in zip(("height", "width"), spec.img_size):
        if size > DIMENSION_LIMITS["img_size"]:
            _fail(f"img_size ({axis})", f"{size} is above the limit {DIMENSION_LIMITS['img_size']}")
    for name in ("in_chans", "embed_dim", "num_classes"):
        if getattr(spec, name) > DIMENSION_LIMITS[name]:
            _fail(name, f"{getattr(spec, name)} is above the limit {DIMENSION_LIMITS[name]}")
    if spec.depth > DIMENSION_LIMITS["depth"]:
        _fail("blocks", f"{spec.depth} blocks is above the limit {DIMENSION_LIMITS['depth']}")
    tokens = spec.num_patches + spec.num_prefix_tokens
    if tokens > MAX_TOKENS:
        _fail("patch_size", f"img_size {tuple(spec.img_size)} / patch_size {spec.patch_size} gives "
              f"{tokens} tokens, above the limit {MAX_TOKENS}")
    width = spec.embed_dim
    parameters = {"patch embedding (in_chans, patch_size, embed_dim)":
                  spec.in_chans * spec.patch_size ** 2 * width + width,
                  "position embedding (img_size, patch_size, embed_dim)": tokens * width,
                  "head (num_classes)": (width + 1) * spec.num_classes * (1 + int(spec.dist_token))}
    for i, block in enumerate(spec.blocks):
        where = f"blocks[{i}]"
        if block.attn is not None:
            if block.attn.num_heads > DIMENSION_LIMITS["heads"]:
                _fail(f"{where}.attn", f"{block.attn.num_heads} heads is above the limit "
                      f"{DIMENSION_LIMITS['heads']}")
            for name in ("qk_dims", "v_dims"):
                if max(getattr(block.attn, name)) > DIMENSION_LIMITS["head_dim"]:
                    _fail(f"{where}.attn.{name}", f"{max(getattr(block.attn, name))} is above the "
                          f"limit {DIMENSION_LIMITS['head_dim']}")
            parameters[f"{where}.attn"] = (width + 1) * block.attn.qkv_out + (block.attn.v_total + 1) * width
        if block.mlp_hidden > DIMENSION_LIMITS["mlp_hidden"]:
            _fail(f"{where}.mlp_hidden", f"{block.mlp_hidden} is above the limit "
                  f"{DIMENSION_LIMITS['mlp_hidden']}")
        parameters[f"{where}.mlp_hidden"] = 2 * width * block.mlp_hidden + block.mlp_hidden + width
    total = sum(parameters.values())
    if total > MAX_PARAMETERS:
        largest = max(parameters, key=parameters.get)
        _fail(largest, f"the model would hold {total:.3g} parameters ({total * 4 / 2**30:.0f} GiB in "
              f"float32), above the limit {MAX_PARAMETERS:.3g}; the largest part is {largest} with "
              f"{parameters[largest]:.3g}")
