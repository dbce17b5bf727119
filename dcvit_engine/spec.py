"""The spec: the single description of a (compressed) timm-style ViT.

Every compression method outputs a ViTSpec plus weights; the engine, the reference
module and the MACs count only ever read a spec. The format is a project-wide
contract (docs/ARCHITECTURE.md, "The spec contract"): field names and meanings must not drift.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, dataclass
from pathlib import Path

from .errors import SpecError
from .jsonfile import load_json_file, parse_json
from .kernels.merge_rules import atme_merged_grid

SPEC_VERSION = 1
SPEC_FILENAME = "spec.json"  # name of the spec inside an artifact folder

GLOBAL_POOLS = ("token", "avg", "")
MERGE_KINDS = ("tome", "atme")
ATME_AXES = ("w", "h")


def _fail(where: str, message: str) -> None:
    raise SpecError(f"invalid spec: {where}: {message}")


def _check_int(where: str, value, minimum: int) -> None:
    # bool is an int subclass; a True width is always a bug in the producer
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(where, f"expected an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        _fail(where, f"must be >= {minimum}, got {value}")


def _check_bool(where: str, value) -> None:
    if not isinstance(value, bool):
        _fail(where, f"expected true/false, got {value!r} ({type(value).__name__})")


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
        for name in ("qkv_bias", "proj_bias", "qk_norm"):
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
    """One transformer block: x += ls1*attn(norm1(x)); [merge]; x += ls2*mlp(norm2(x))."""
    attn: AttentionSpec | None   # None = attention branch (and norm1, ls1) removed
    mlp_hidden: int              # 0 = MLP branch (and norm2, ls2) removed
    layer_scale: bool = False    # ls1.gamma / ls2.gamma present (timm LayerScale)
    merge: MergeSpec | None = None

    def validate(self, where: str = "block") -> None:
        if self.attn is not None:
            if not isinstance(self.attn, AttentionSpec):
                _fail(f"{where}.attn", f"expected AttentionSpec or None, got {type(self.attn).__name__}")
            self.attn.validate(f"{where}.attn")
        _check_int(f"{where}.mlp_hidden", self.mlp_hidden, 0)
        _check_bool(f"{where}.layer_scale", self.layer_scale)
        if self.merge is not None:
            if not isinstance(self.merge, MergeSpec):
                _fail(f"{where}.merge", f"expected MergeSpec or None, got {type(self.merge).__name__}")
            self.merge.validate(f"{where}.merge")


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
        return int(self.class_token) + int(self.dist_token)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    # ---- validation ---------------------------------------------------------------
    def validate(self) -> "ViTSpec":
        """Raise ValueError naming the first bad field; return self for chaining."""
        _check_int("version", self.version, 0)
        if self.version != SPEC_VERSION:
            _fail("version", f"unsupported spec version {self.version}; this dcvit_engine reads "
                  f"version {SPEC_VERSION} (upgrade dcvit_engine or re-export the model)")
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
        _check_limits(self)  # before anything allocates: a hostile spec must not exhaust memory
        merge_schedule(self)  # raises on merges the token count cannot support
        return self

    # ---- (de)serialisation --------------------------------------------------------
    def to_dict(self) -> dict:
        def block_dict(b: BlockSpec) -> dict:
            return {
                "attn": None if b.attn is None else {
                    "qk_dims": list(b.attn.qk_dims), "v_dims": list(b.attn.v_dims),
                    "scale": float(b.attn.scale), "qkv_bias": b.attn.qkv_bias,
                    "proj_bias": b.attn.proj_bias, "qk_norm": b.attn.qk_norm},
                "mlp_hidden": b.mlp_hidden,
                "layer_scale": b.layer_scale,
                "merge": None if b.merge is None else {
                    "kind": b.merge.kind, "r": b.merge.r, "axis": b.merge.axis},
            }
        return {
            "version": self.version,
            "img_size": list(self.img_size), "patch_size": self.patch_size,
            "in_chans": self.in_chans, "embed_dim": self.embed_dim,
            "num_classes": self.num_classes, "class_token": self.class_token,
            "dist_token": self.dist_token, "global_pool": self.global_pool,
            "fc_norm": self.fc_norm, "pre_norm": self.pre_norm, "final_norm": self.final_norm,
            "no_embed_class": self.no_embed_class, "norm_eps": float(self.norm_eps),
            "prop_attn": self.prop_attn,
            "blocks": [block_dict(b) for b in self.blocks],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ViTSpec":
        """Build and validate a spec from plain data (e.g. parsed JSON)."""
        _check_keys("spec", data, cls)
        # check the version first: a newer format may not even have today's fields
        _check_int("version", data.get("version", SPEC_VERSION), 0)
        if data.get("version", SPEC_VERSION) != SPEC_VERSION:
            _fail("version", f"unsupported spec version {data['version']}; this dcvit_engine reads "
                  f"version {SPEC_VERSION} (upgrade dcvit_engine or re-export the model)")
        if not isinstance(data["blocks"], list):
            _fail("blocks", f"expected a list, got {type(data['blocks']).__name__}")
        blocks = []
        for i, bd in enumerate(data["blocks"]):
            where = f"blocks[{i}]"
            _check_keys(where, bd, BlockSpec)
            attn = bd.get("attn")
            if attn is not None:
                _check_keys(f"{where}.attn", attn, AttentionSpec)
                attn = AttentionSpec(**attn)
            merge = bd.get("merge")
            if merge is not None:
                _check_keys(f"{where}.merge", merge, MergeSpec)
                merge = MergeSpec(**merge)
            blocks.append(BlockSpec(attn=attn, mlp_hidden=bd["mlp_hidden"],
                                    layer_scale=bd.get("layer_scale", False), merge=merge))
        fields = {k: v for k, v in data.items() if k != "blocks"}
        img_size = fields["img_size"]
        if isinstance(img_size, list):
            fields["img_size"] = tuple(img_size)
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
            mergeable = (tokens - prefix) // 2
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
