"""What the nodes share: the PLADIS inputs, input checks and the words of their messages."""
from comfy_api.latest import io

from .selection import describe_range, parse_index_list
from ..pladis_comfy.architectures import APPLY_TGATE, FLUX_PATCH, find_architecture, supported

RANGES = {"scale": (-5.0, 10.0), "alpha": (1.0, 2.0), "start_percent": (0.0, 1.0), "end_percent": (0.0, 1.0)}


def patch_category():
    """Where the host puts its own model patch nodes ("model/patch/unet" in newer ComfyUI,
    "model_patches/unet" in 0.3.75): the pack's nodes sit beside them."""
    try:
        from comfy_extras.nodes_eps import EpsilonScaling
    except ImportError:  # a ComfyUI without that node: the newest convention
        return "model/patch/unet"
    return EpsilonScaling.define_schema().category


def schema_extras(search_aliases):
    """Schema fields the running host knows beyond 0.3.75's (its node search finds a node by these words)."""
    return {"search_aliases": search_aliases} if "search_aliases" in io.Schema.__dataclass_fields__ else {}


def pladis_inputs():
    """scale, alpha, start_percent and end_percent: the same in every PLADIS node."""
    return [
        io.Float.Input(
            "scale", default=2.0, min=RANGES["scale"][0], max=RANGES["scale"][1], step=0.05,
            tooltip="lambda: 0 is plain attention, 1 is pure entmax, 2 is the paper's setting. "
            "Lower it (1.0-1.5) if tag-based models grow extra objects; higher over-smooths like high CFG.",
        ),
        io.Float.Input(
            "alpha", default=1.5, min=RANGES["alpha"][0], max=RANGES["alpha"][1], step=0.05,
            tooltip="Sparsity of the entmax map: 1.5 (default) and 2.0 (sparsemax) are the paper's choices; "
            "1.0 is softmax, which changes nothing.",
        ),
        io.Float.Input(
            "start_percent", default=0.0, min=RANGES["start_percent"][0], max=RANGES["start_percent"][1], step=0.01,
            tooltip="Part of the schedule where PLADIS starts (0 = first step); before it attention is plain.",
        ),
        io.Float.Input(
            "end_percent", default=1.0, min=RANGES["end_percent"][0], max=RANGES["end_percent"][1], step=0.01,
            tooltip="Part of the schedule where PLADIS stops (1 = last step); after it attention is plain.",
        ),
    ]


def check_pladis_inputs(node, scale, alpha, start_percent, end_percent):
    """Refuse values the UI would refuse, also when a node is called directly."""
    for name, value in (("scale", scale), ("alpha", alpha), ("start_percent", start_percent), ("end_percent", end_percent)):
        low, high = RANGES[name]
        if not low <= value <= high:
            raise ValueError(f"{name} must lie between {low} and {high}, got {value}.")
    if start_percent > end_percent:
        raise ValueError(f"{node}: start_percent ({start_percent}) is after end_percent ({end_percent}); make start_percent <= end_percent.")


def model_type_name(model):
    return type(model.model).__name__


def unsupported_model_error(node, model):
    """The error of a node that cannot patch this model: what the node patches, and why not this model."""
    name = model_type_name(model)
    diffusion_model = model.get_model_object("diffusion_model")
    architecture = find_architecture(diffusion_model)
    if architecture is None:
        kind = type(diffusion_model)
        hint = f"The pack does not know its architecture ({kind.__module__}.{kind.__name__})."
    elif architecture.refused:
        hint = f"{architecture.refused}."
    elif node == APPLY_TGATE:
        hint = f"TGATE does not apply to {architecture.models}: {architecture.tgate}."
    elif architecture.node == FLUX_PATCH:
        hint = "Its text and image tokens share one joint attention: use the 'PLADIS Flux Patch' node instead."
    else:
        hint = "Its text enters through cross-attention: use the 'Apply PLADIS' node instead."
    return ValueError(f"{node} works on {supported(node)}; this model is {name}. {hint}")


def percent_range_to_sigmas(model, start_percent, end_percent):
    """(sigma_start, sigma_end) for a part of the schedule, with the whole of it left unbounded."""
    sampling = model.get_model_object("model_sampling")
    sigma_start = float("inf") if start_percent <= 0.0 else float(sampling.percent_to_sigma(start_percent))
    sigma_end = 0.0 if end_percent >= 1.0 else float(sampling.percent_to_sigma(end_percent))
    return sigma_start, sigma_end


def describe_blocks(keys):
    """{("input", 4), ("input", 5), ("output", 3)} -> "input 4,5; output 3"."""
    by_stage = {}
    for stage, number in keys:
        by_stage.setdefault(stage, []).append(number)
    return "; ".join(f"{stage} {','.join(map(str, sorted(numbers)))}" for stage, numbers in by_stage.items())


def select_indexes(node, name, text, count):
    """The block indexes a STRING input names: 'all', 'none' or a list such as 0-9,12.
    Indexes the model lacks are an error that names them and says what the model has."""
    words = text.strip().lower()
    if words in ("all", ""):
        return set(range(count))
    if words == "none":
        return set()
    try:
        ranges = parse_index_list(words)
    except ValueError as e:
        raise ValueError(f"{node}: {name} '{text}': {e}; write 'all', 'none' or indexes such as 0-9,12.") from None
    beyond = [describe_range(max(first, count), last) for first, last in ranges if last >= count]
    if beyond:
        has = f"0-{count - 1}" if count else "none"
        raise ValueError(f"{node}: {name} names {', '.join(beyond)}, which this model lacks; it has {has}.")
    return {i for first, last in ranges for i in range(first, last + 1)}
