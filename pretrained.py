"""Load the weights users download into this project's networks: one loader, clear errors.

The encoder starts from ImageNet weights (paper §4.1, "Implementation details"). They ship in
several layouts, and `load_pretrained(encoder, path)` reads them all: it reads the file, recognises
the layout from its keys, renames the keys onto the encoder's own (the MiT of `model.py`, whose
names are those of SegFormer's release, or the ViT of `vit.py`, whose names are timm's), drops what
is not the encoder (an ImageNet classifier and, in timm's average-pooling ViTs, the `fc_norm` before
it; a segmentation decoder) and loads the rest strictly:
every tensor of the encoder must come from the file with its exact shape, and nothing else may be
left over. Recognised layouts, with one of their keys:

  SegFormer's ImageNet release, mit_b0.pth … mit_b5.pth    block1.0.attn.q.weight
  a full SegFormer checkpoint (SegFormer's repository)       backbone.block1.0.attn.q.weight
  a full mmsegmentation SegFormer checkpoint                 backbone.layers.0.1.0.attn.attn.in_proj_weight
  Hugging Face nvidia/mit-b0 … mit-b5 and the fine-tuned     segformer.encoder.block.0.0.attention.self.query.weight
    nvidia/segformer-b* (pytorch_model.bin, model.safetensors)
  timm and DeiT ViTs (e.g. deit_small_patch16_224-cd65a155.pth, timm's model.safetensors)
                                                             blocks.0.attn.qkv.weight
  Hugging Face ViT and DeiT (google/vit-base-patch16-224, facebook/deit-small-patch16-224)
                                                             vit.encoder.layer.0.attention.attention.query.weight
  a checkpoint written by this project's train.py            encoder.block1.0.attn.q.weight

Full checkpoints may hold the weights under "state_dict" or "model", and keys may carry the
"module." prefix of a DistributedDataParallel model. Where a layout splits one of our matrices
(Hugging Face's query + key/value, or query + key + value; mmsegmentation's in_proj = [q; kv]),
the pieces are concatenated in the order our forward pass splits them. A ViT file's position
embedding is resized (bicubic, as timm does) to the encoder's 14 × 14 pre-training grid when it was
trained at another resolution. Hugging Face builds its LayerNorms with eps 1e-5 (SegFormer) or 1e-12
(ViT) where SegFormer's and timm's blocks use 1e-6: the weights are the same, the outputs differ
slightly.

`.safetensors` files are read with the `safetensors` package, imported only for such a file
(`pip install safetensors`). Any other file — a text or HTML page saved in place of the weights, a
Git LFS pointer, a checkpoint of another architecture — gives one line saying what it is and, where
one of this project's backbones fits it, which `--backbone` to use.

Trained networks of the authors' release (the whole network, not an ImageNet encoder) are the state
dict of its DistributedDataParallel wrapper, saved by its training script, under "module.":
`encoder.*` (the MiT, named as ours), `decoder.*` (SegFormer's head: `linear_c1` … `linear_c4.proj`,
`linear_fuse.conv`, `linear_fuse.bn`, `linear_pred`, named as ours), `classifier.weight` and
`attn_proj.*`, the AFA head, our `affinity_head.proj`. `afanet_from_release` renames such a state
dict (with or without "module.") onto `model.AFANet`, `afanet_to_release` the other way.
"""
import re
import zipfile
from pathlib import Path

import torch

from model import MIT_CONFIGS
from vit import PATCH_SIZE, VIT_CONFIGS, resample_position_embedding

# Each layout is recognised by one key, possibly after one of these prefixes; keys outside the
# prefix (a classifier, a decoder) are not the encoder and are dropped.
LAYOUT_SIGNATURES = {
    "segformer": "patch_embed1.proj.weight",
    "mmseg": "layers.0.0.projection.weight",
    "hf_segformer": "encoder.patch_embeddings.0.proj.weight",
    "timm_vit": "blocks.0.attn.qkv.weight",
    "hf_vit": "embeddings.patch_embeddings.projection.weight",
}
PREFIXES = ("", "module.", "backbone.", "module.backbone.", "segformer.", "vit.", "deit.", "encoder.",
            "module.encoder.")
LAYOUT_NAMES = {
    "segformer": "SegFormer MiT weights",
    "mmseg": "mmsegmentation SegFormer weights",
    "hf_segformer": "Hugging Face SegFormer weights",
    "timm_vit": "timm/DeiT ViT weights",
    "hf_vit": "Hugging Face ViT weights",
}
# Classifier heads that live inside the encoder's namespace in some layouts; dropped. timm's ViTs
# with average pooling (global_pool="avg") carry `fc_norm`, the LayerNorm of the pooled token
# before the head: part of the classifier, since our ViT ends with its own per-token `norm`.
HEAD_PREFIXES = ("head.", "head_dist.", "pre_logits.", "pooler.", "fc_norm.")
# Where each kind of ImageNet weights is downloaded from, for the message of a missing file.
WHERE_TO_GET = {
    "MiT": "SegFormer's ImageNet-1k mit_b0.pth … mit_b5.pth (the paper: mit_b1.pth) are linked from "
           "https://github.com/NVlabs/SegFormer#training, or Hugging Face nvidia/mit-b1",
    "ViT": "DeiT's deit_small_patch16_224 / deit_base_patch16_224 files "
           "(https://github.com/facebookresearch/deit) or timm's vit_*_patch16_224",
}

# Renamings as (ours, theirs) pairs of prefixes of what follows the stage / block index in a key.
HF_PATCH_RENAMES = (("norm.", "layer_norm."),)  # (ours, Hugging Face SegFormer)
HF_BLOCK_RENAMES = (  # (ours, Hugging Face SegFormer), within a block
    ("norm1.", "layer_norm_1."), ("norm2.", "layer_norm_2."),
    ("attn.q.", "attention.self.query."), ("attn.sr.", "attention.self.sr."),
    ("attn.norm.", "attention.self.layer_norm."), ("attn.proj.", "attention.output.dense."),
    ("mlp.fc1.", "mlp.dense1."), ("mlp.dwconv.", "mlp.dwconv."), ("mlp.fc2.", "mlp.dense2."),
)
HF_VIT_RENAMES = (  # (ours, Hugging Face ViT), outside the blocks
    ("cls_token", "embeddings.cls_token"), ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.proj.", "embeddings.patch_embeddings.projection."), ("norm.", "layernorm."),
)
HF_VIT_BLOCK_RENAMES = (  # (ours, Hugging Face ViT), within a block
    ("norm1.", "layernorm_before."), ("norm2.", "layernorm_after."),
    ("attn.proj.", "attention.output.dense."), ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
)


# ---------------------------------------------------------------- loading

def load_pretrained(encoder, path):
    """Load a weights file (any layout of the module docstring) into `encoder` in place, strictly
    except for the classifier head and other non-encoder parts. Returns a short description of what
    was loaded, for the log. Raises FileNotFoundError for a missing file and ValueError, in one
    line naming the file and the fix, for everything else.
    """
    path = Path(path)
    expected = encoder.state_dict()
    model_backbone = describe_state(expected) or "custom"
    kind = "ViT" if "cls_token" in expected else "MiT"
    state = read_state_dict(path, kind)

    layout, prefix = find_layout(state)
    if layout is None:
        raise ValueError(f"{path} does not fit this encoder ({model_backbone}): it does not look "
                         f"like a SegFormer MiT or ViT checkpoint but like {guess_architecture(state)}. "
                         f"This project's backbones load SegFormer's mit_b*.pth (--backbone mit_b0/mit_b1) "
                         f"and timm/DeiT ViT-Ti/S/B/16 files (--backbone vit_tiny16/vit_s16/vit_b16).")
    # the encoder's part: the keys under the prefix, without a classifier head
    dropped = sorted({key.split(".")[0] for key in state if not key.startswith(prefix)})
    state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    if "fc_norm.weight" in state and "norm.weight" not in state and "norm.weight" in expected:
        raise ValueError(f"{path} is a ViT with average pooling (timm's fc_norm normalises the pooled "
                         f"token; the file has no final per-token norm), but this encoder ends with a "
                         f"LayerNorm over every token; use the weights of a class-token ViT "
                         f"(deit_*_patch16_224, timm's augreg vit_*_patch16_224)")
    dropped += sorted({key.split(".")[0] for key in state if key.startswith(HEAD_PREFIXES)})
    state = {key: value for key, value in state.items() if not key.startswith(HEAD_PREFIXES)}
    convert = {"mmseg": segformer_from_mmseg, "hf_segformer": segformer_from_hf, "hf_vit": vit_from_hf}
    if layout in convert:
        state = convert[layout](state)  # in this module's names
    if "dist_token" in state and "dist_token" not in expected:
        raise ValueError(f"{path} is a distilled DeiT (it has a distillation token), which this ViT "
                         f"does not have; use the weights of the plain DeiT (deit_*_patch16_224)")
    notes = []
    if "pos_embed" in state and "pos_embed" in expected:
        state["pos_embed"], resized = _fit_position_embedding(state["pos_embed"], expected["pos_embed"],
                                                              encoder, path)
        notes += [resized] if resized else []

    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
                  for key in expected if key in state and state[key].shape != expected[key].shape]
    if missing or unexpected or mismatched:
        raise ValueError(_mismatch_message(path, state, model_backbone, missing, unexpected, mismatched))
    encoder.load_state_dict(state, strict=True)

    origin = LAYOUT_NAMES[layout]
    if prefix.endswith("encoder."):
        origin = "the encoder of an AFA checkpoint"
    elif "backbone." in prefix:
        origin += ", the backbone of a segmentation checkpoint"
    if dropped:
        notes.append("dropped " + ", ".join(f"{name}.*" for name in dropped))
    return f"{origin} ({model_backbone}" + "".join(f"; {note}" for note in notes) + ")"


def _fit_position_embedding(pos_embed, expected, encoder, path):
    """A ViT file's position embedding (1, 1 + g·g, D), resized to the encoder's pre-training grid
    when its grid differs; returns it and a note (or "")."""
    if pos_embed.shape == expected.shape or pos_embed.ndim != 3 or pos_embed.shape[-1] != expected.shape[-1]:
        return pos_embed, ""  # equal, or a width mismatch that the strict check reports
    side = int(round((pos_embed.shape[1] - 1) ** 0.5))
    if side * side != pos_embed.shape[1] - 1:
        raise ValueError(f"{path}: its position embedding holds {pos_embed.shape[1]} tokens, not a class "
                         f"token and a square grid; only ViTs with one class token are supported")
    resized = resample_position_embedding(pos_embed, (side, side), encoder.grid_size)  # (1, 1 + h·w, D)
    return resized, f"position embedding resized from {side}×{side} to {encoder.grid_size[0]}×{encoder.grid_size[1]}"


def _mismatch_message(path, state, model_backbone, missing, unexpected, mismatched):
    """One line: what the file holds when that is not the encoder's backbone (and the --backbone
    that fits it), then the missing, unexpected and mis-shaped keys."""
    def some(keys, limit=3):
        return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({some(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches, file vs model ({some(mismatched)})")
    file_backbone = describe_state(state)
    if file_backbone is None:
        verdict = "it does not look like a SegFormer MiT or timm ViT checkpoint"
    elif file_backbone == model_backbone:
        verdict = f"the file is for {file_backbone} too, but its keys differ"
    elif file_backbone in MIT_CONFIGS or file_backbone in VIT_CONFIGS:
        verdict = (f"the file seems to be for {file_backbone}: build the model with "
                   f"backbone={file_backbone!r} (--backbone {file_backbone})")
    else:
        verdict = f"the file seems to be for {file_backbone}, which none of this project's backbones matches"
    return f"{path} does not fit this encoder ({model_backbone}): {verdict}. " + "; ".join(problems) + "."


# ---------------------------------------------------------------- reading a file

def read_state_dict(path, kind="encoder"):
    """The tensors of a weights file as a flat dict {key: tensor}, unwrapped from "state_dict" or
    "model" if need be. `kind` names the weights in messages ("MiT", "ViT").

    Raises FileNotFoundError for a missing file and ValueError, in one line saying what the file
    is and what to do, for anything that is not a readable file of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} weights file not found: {path}"
                                + (f"; {WHERE_TO_GET[kind]}" if kind in WHERE_TO_GET else ""))
    with path.open("rb") as file:
        head = file.read(512)
    cannot = f"cannot read {kind} weights from {path}"
    file_format = weights_format(path, head)
    if file_format == "safetensors":
        state = _read_safetensors(path, cannot)
    elif file_format in ("zip", "pickle"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types for truncated / foreign files
            raise ValueError(_torch_load_failure(cannot, path, error)) from None
    else:
        raise ValueError(f"{cannot}: {what_it_is(path, head)}")
    if isinstance(state, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def weights_format(path, head):
    """The format of a file from its first bytes `head`: "zip" (PyTorch's archive), "pickle"
    (PyTorch's legacy format), "safetensors", or None for anything else."""
    if head.startswith(b"PK\x03\x04"):
        return None if _is_numpy_archive(path) else "zip"
    if head[:1] == b"\x80":
        return "pickle"  # a pickle protocol byte
    if len(head) >= 9 and head[8:9] == b"{" and \
            8 + int.from_bytes(head[:8], "little") <= path.stat().st_size:
        return "safetensors"  # an 8-byte little-endian header length, then a JSON header
    return None


def _is_numpy_archive(path):
    try:
        names = zipfile.ZipFile(path).namelist()
    except (zipfile.BadZipFile, OSError):
        return False  # a damaged PyTorch archive: torch.load reports it
    return bool(names) and all(name.endswith(".npy") for name in names)


def what_it_is(path, head):
    """What a file that is not a weights file is, and what to do, from its first bytes `head`;
    worded to follow "cannot read ... from PATH: "."""
    if not head:
        return "the file is empty (an interrupted download?); download it again"
    if head.startswith(b"PK\x03\x04"):
        return ("it is a NumPy archive (.npz, e.g. the original JAX ViT release), not a PyTorch "
                "checkpoint; download the PyTorch file (timm's .pth or model.safetensors)")
    if head.startswith(b"\x89HDF"):
        return ("it is an HDF5 file (TensorFlow/Keras weights, e.g. tf_model.h5); download "
                "pytorch_model.bin or model.safetensors instead")
    if head.startswith(b"\x93NUMPY"):
        return "it is a NumPy array (.npy), not a PyTorch checkpoint"
    text = _as_text(head)
    if text is None:
        if path.suffix == ".safetensors":
            return "it is not a valid .safetensors file (damaged or truncated?); download it again"
        return "it is not a PyTorch checkpoint (unknown binary format)"
    start = text.lstrip().lower()
    if start.startswith("version https://git-lfs"):
        return ("it is a Git LFS pointer, not the weights (the repository was cloned without "
                "git-lfs); run `git lfs pull` or download the file itself")
    if start.startswith(("<!doctype html", "<html")):
        return ("it is an HTML page, not the weights (a web page saved in place of the file); "
                "download the file itself (on Hugging Face, the 'resolve' link, not 'blob')")
    if start.startswith("{"):
        return "it is a JSON file (config.json?), not the weights; pass pytorch_model.bin or model.safetensors"
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    return f"it is a text file, not a checkpoint (it begins {first_line[:40]!r})"


def _as_text(head):
    """`head` decoded as printable UTF-8 text, or None for binary data."""
    for cut in range(4):  # the bytes read may end inside a multi-byte character
        try:
            text = head[:len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return text if all(c.isprintable() or c in "\r\n\t" for c in text) else None
    return None


def _read_safetensors(path, cannot):
    try:
        from safetensors.torch import load_file  # optional: needed for .safetensors files only
    except ImportError:
        raise ValueError(f"{path} is a .safetensors file; reading it needs the safetensors package: "
                         f"pip install safetensors") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # the package raises its own SafetensorError
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{cannot}: damaged .safetensors file ({detail}); download it again") from None


def _torch_load_failure(cannot, path, error):
    """One line for a torch.load failure (its own messages run over many lines, or say '101')."""
    unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if unsupported:
        return (f"{cannot}: besides tensors it holds Python objects ({unsupported.group(1)}), which are "
                f"not unpickled for safety; if you trust the file, save its tensors alone: python -c "
                f"\"import torch; c = torch.load('{path}', weights_only=False); "
                f"torch.save(c.get('state_dict', c.get('model', c)), 'weights.pth')\"")
    return f"{cannot} (truncated, or not a PyTorch checkpoint of tensors); download it again"


# ---------------------------------------------------------------- layouts

def find_layout(state):
    """(layout, prefix) of a state dict: the first LAYOUT_SIGNATURES key found after a PREFIXES
    prefix, or (None, "") when none is."""
    for layout, signature in LAYOUT_SIGNATURES.items():
        for prefix in PREFIXES:
            if prefix + signature in state:
                return layout, prefix
    return None, ""


def segformer_from_hf(state):
    """Hugging Face SegFormer encoder keys (without "segformer.") -> SegFormer's release names.

    encoder.patch_embeddings.{i}.proj / .layer_norm   -> patch_embed{i+1}.proj / .norm
    encoder.block.{i}.{j}.layer_norm_1 / _2           -> block{i+1}.{j}.norm1 / norm2
      attention.self.query / .sr / .layer_norm        -> attn.q / attn.sr / attn.norm
      attention.self.key + attention.self.value       -> attn.kv (rows: key, then value)
      attention.output.dense                          -> attn.proj
      mlp.dense1 / mlp.dwconv.dwconv / mlp.dense2     -> mlp.fc1 / mlp.dwconv.dwconv / mlp.fc2
    encoder.layer_norm.{i}                            -> norm{i+1}
    Keys that match none of these are kept as they are (and so reported as unexpected).
    """
    out, keys, values = {}, {}, {}
    for name, tensor in state.items():
        match = re.fullmatch(r"encoder\.(patch_embeddings|block|layer_norm)\.(\d+)\.(.+)", name)
        if match is None:
            out[name] = tensor
            continue
        part, stage, rest = match.group(1), int(match.group(2)) + 1, match.group(3)
        if part == "patch_embeddings":
            out[f"patch_embed{stage}.{_rename(rest, HF_PATCH_RENAMES)}"] = tensor
        elif part == "layer_norm":
            out[f"norm{stage}.{rest}"] = tensor
        else:
            block, rest = rest.split(".", 1)
            target = f"block{stage}.{block}"
            kv = re.fullmatch(r"attention\.self\.(key|value)\.(weight|bias)", rest)
            if kv:
                (keys if kv.group(1) == "key" else values)[f"{target}.attn.kv.{kv.group(2)}"] = (name, tensor)
            else:
                out[f"{target}.{_rename(rest, HF_BLOCK_RENAMES)}"] = tensor
    _merge_pieces(out, [keys, values])
    return out


def segformer_to_hf(state, prefix="segformer.encoder."):
    """SegFormer's release names -> Hugging Face's (the inverse of `segformer_from_hf`), e.g. to
    hand an encoder trained here to transformers' SegformerModel."""
    out = {}
    for name, tensor in state.items():
        match = re.fullmatch(r"(patch_embed|block|norm)(\d+)\.(.+)", name)
        if match is None:
            out[name] = tensor
            continue
        part, index, rest = match.group(1), int(match.group(2)) - 1, match.group(3)
        if part == "patch_embed":
            out[f"{prefix}patch_embeddings.{index}.{_rename(rest, HF_PATCH_RENAMES, inverse=True)}"] = tensor
        elif part == "norm":
            out[f"{prefix}layer_norm.{index}.{rest}"] = tensor
        else:
            block, rest = rest.split(".", 1)
            target = f"{prefix}block.{index}.{block}"
            kv = re.fullmatch(r"attn\.kv\.(weight|bias)", rest)
            if kv:
                key, value = tensor.chunk(2, dim=0)  # (2C, ...) -> rows of the keys, then the values
                out[f"{target}.attention.self.key.{kv.group(1)}"] = key
                out[f"{target}.attention.self.value.{kv.group(1)}"] = value
            else:
                out[f"{target}.{_rename(rest, HF_BLOCK_RENAMES, inverse=True)}"] = tensor
    return out


def segformer_from_mmseg(state):
    """mmsegmentation's MiT keys (without "backbone.") -> SegFormer's release names.

    layers.{i}.0.projection / .norm          -> patch_embed{i+1}.proj / .norm
    layers.{i}.1.{j}.norm1 / norm2            -> block{i+1}.{j}.norm1 / norm2
      attn.attn.in_proj_weight / _bias        -> attn.q (first C rows) and attn.kv (the other 2C)
      attn.attn.out_proj / attn.sr / attn.norm -> attn.proj / attn.sr / attn.norm
      ffn.layers.0 / .1 / .4                  -> mlp.fc1 / mlp.dwconv.dwconv / mlp.fc2 (1×1 convs
                                                 there, Linear here: (C', C, 1, 1) -> (C', C))
    layers.{i}.2                              -> norm{i+1}
    """
    out = {}
    for name, tensor in state.items():
        match = re.fullmatch(r"layers\.(\d+)\.([012])\.(.+)", name)
        if match is None:
            out[name] = tensor
            continue
        stage, part, rest = int(match.group(1)) + 1, match.group(2), match.group(3)
        if part == "0":
            out[f"patch_embed{stage}.{rest.replace('projection.', 'proj.', 1)}"] = tensor
        elif part == "2":
            out[f"norm{stage}.{rest}"] = tensor
        else:
            block, rest = rest.split(".", 1)
            target = f"block{stage}.{block}"
            in_proj = re.fullmatch(r"attn\.attn\.in_proj_(weight|bias)", rest)
            ffn = re.fullmatch(r"ffn\.layers\.([014])\.(weight|bias)", rest)
            if in_proj:
                width = tensor.shape[0] // 3  # in_proj = [q; k; v], each C rows
                out[f"{target}.attn.q.{in_proj.group(1)}"] = tensor[:width]
                out[f"{target}.attn.kv.{in_proj.group(1)}"] = tensor[width:]
            elif ffn:
                layer = {"0": "fc1", "1": "dwconv.dwconv", "4": "fc2"}[ffn.group(1)]
                if layer != "dwconv.dwconv" and ffn.group(2) == "weight":
                    tensor = tensor.flatten(1)  # (C', C, 1, 1) -> (C', C)
                out[f"{target}.mlp.{layer}.{ffn.group(2)}"] = tensor
            else:
                out[f"{target}.{rest.replace('attn.attn.out_proj.', 'attn.proj.', 1)}"] = tensor
    return out


def vit_from_hf(state):
    """Hugging Face ViT/DeiT keys (without "vit." / "deit.") -> timm's names.

    embeddings.cls_token / .position_embeddings      -> cls_token / pos_embed
    embeddings.patch_embeddings.projection           -> patch_embed.proj
    encoder.layer.{i}.layernorm_before / _after      -> blocks.{i}.norm1 / norm2
      attention.attention.query + key + value        -> attn.qkv (rows: q, k, v)
      attention.output.dense                         -> attn.proj
      intermediate.dense / output.dense              -> mlp.fc1 / mlp.fc2
    layernorm                                        -> norm
    """
    out, pieces = {}, {"query": {}, "key": {}, "value": {}}
    for name, tensor in state.items():
        match = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", name)
        if match is None:
            out[_rename(name, HF_VIT_RENAMES)] = tensor
            continue
        target, rest = f"blocks.{match.group(1)}", match.group(2)
        qkv = re.fullmatch(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)
        if qkv:
            pieces[qkv.group(1)][f"{target}.attn.qkv.{qkv.group(2)}"] = (name, tensor)
        else:
            out[f"{target}.{_rename(rest, HF_VIT_BLOCK_RENAMES)}"] = tensor
    _merge_pieces(out, [pieces["query"], pieces["key"], pieces["value"]])
    return out


def _rename(rest, renames, inverse=False):
    """Replace the first matching prefix of `rest`: renames are (ours, theirs) pairs, applied
    theirs -> ours, or ours -> theirs with `inverse`."""
    for ours, theirs in renames:
        old, new = (ours, theirs) if inverse else (theirs, ours)
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _merge_pieces(out, parts):
    """Concatenate along rows the pieces each of `parts` ({our key: (their key, tensor)}) holds for
    one of our keys; a key that lacks a piece keeps its pieces under their own names."""
    for target in parts[0].keys() | set().union(*(p.keys() for p in parts[1:])):
        if all(target in p for p in parts):
            out[target] = torch.cat([p[target][1] for p in parts], dim=0)
        else:
            out.update({p[target][0]: p[target][1] for p in parts if target in p})


# ---------------------------------------------------------------- the authors' trained networks

RELEASE_PREFIXES = ("module.", "")  # with DistributedDataParallel's prefix as saved, or stripped
RELEASE_SIGNATURES = ("encoder.patch_embed1.proj.weight", "classifier.weight", "attn_proj.weight")
RELEASE_RENAMES = (("affinity_head.proj.", "attn_proj."),)  # (ours, the release's); all else is equal


def release_prefix(state):
    """"module." or "" when `state` is a trained network of the authors' release with its keys under
    that prefix (it holds every key of RELEASE_SIGNATURES there), else None."""
    for prefix in RELEASE_PREFIXES:
        if all(prefix + key in state for key in RELEASE_SIGNATURES):
            return prefix
    return None


def afanet_from_release(state):
    """A trained network of the authors' release -> the state dict of `model.AFANet`: the prefix of
    `release_prefix` removed, `attn_proj.*` -> `affinity_head.proj.*`; encoder, decoder and
    classifier keys stay as they are. Raises ValueError when `state` is not in that layout."""
    prefix = release_prefix(state)
    if prefix is None:
        raise ValueError("not a trained network of the authors' release: it lacks "
                         + ", ".join(f"[module.]{key}" for key in RELEASE_SIGNATURES))
    return {_rename(key[len(prefix):] if key.startswith(prefix) else key, RELEASE_RENAMES): tensor
            for key, tensor in state.items()}


def afanet_to_release(state, prefix="module."):
    """The state dict of a MiT `model.AFANet` -> the release's layout (the inverse of
    `afanet_from_release`), e.g. for the release's test script, which strips "module." itself."""
    return {prefix + _rename(key, RELEASE_RENAMES, inverse=True): tensor for key, tensor in state.items()}


# ---------------------------------------------------------------- naming what a state dict holds

def describe_state(state):
    """Name the backbone a state dict in our layout was saved from: "mit_b1", "vit_s16", a
    description such as "a ViT 384 wide with 12 blocks and patch 8", or None if it is neither."""
    if "patch_embed1.proj.weight" in state:
        embed_dims, depths = [], []
        for stage in range(1, 5):
            proj = state.get(f"patch_embed{stage}.proj.weight")
            if proj is None or proj.ndim != 4:
                return f"a MiT with {stage - 1} stages"
            embed_dims.append(proj.shape[0])  # (C_i, C_{i-1}, k, k)
            depths.append(len({key.split(".")[1] for key in state if key.startswith(f"block{stage}.")}))
        for name, config in MIT_CONFIGS.items():  # SegFormer's sizes (Xie et al. 2021, Table 6)
            if (tuple(config["embed_dims"]), tuple(config["depths"])) == (tuple(embed_dims), tuple(depths)):
                return name
        return f"a MiT with embed dims {embed_dims} and depths {depths}"
    proj = state.get("patch_embed.proj.weight")
    if proj is not None and proj.ndim == 4 and "blocks.0.attn.qkv.weight" in state:
        width, patch = proj.shape[0], proj.shape[-1]  # (D, 3, p, p)
        depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
        for name, config in VIT_CONFIGS.items():
            if (config["embed_dim"], config["depth"], PATCH_SIZE) == (width, depth, patch):
                return name
        return f"a ViT {width} wide with {depth} blocks and patch {patch}"
    return None


def guess_architecture(state):
    """A few words on what a state dict that is neither a MiT nor a ViT of ours seems to hold."""
    keys = list(state)
    signs = (("relative_position_bias_table", "a Swin Transformer or BEiT"),
             ("layer1.0.conv1.weight", "a ResNet"),
             ("conv_proj.weight", "a torchvision ViT (download the timm or DeiT file of the same model)"),
             ("downsample_layers.0.0.weight", "a ConvNeXt"), ("stages.0.blocks.0.conv_dw.weight", "a ConvNeXt"),
             ("visual.transformer.resblocks.0.attn.in_proj_weight", "a CLIP model"),
             ("encoder.layer.0.attention.self.query.weight", "a BERT-style text model"))
    for sign, name in signs:
        if any(key.endswith(sign) for key in keys):
            return name
    shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
    return f"an unknown model ({len(keys)} tensors, keys such as {shown})"
