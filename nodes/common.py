"""What the nodes share: input checks and the words of their messages."""

# Joint-attention models, where text and image share one softmax, need the Flux node.
JOINT_ATTENTION_MODELS = ("Flux", "Chroma", "SD3", "QwenImage", "Lumina2", "HiDream", "AuraFlow")


def check_range(name, value, low, high):
    """Refuse values the UI would refuse, also when a node is called directly."""
    if not low <= value <= high:
        raise ValueError(f"{name} must lie between {low} and {high}, got {value}.")


def model_type_name(model):
    return type(model.model).__name__


def unsupported_model_error(node, model, supported="UNet models (SD1.x, SD2.x, SDXL)"):
    name = model_type_name(model)
    if any(name.startswith(joint) for joint in JOINT_ATTENTION_MODELS):
        hint = "Its text and image tokens share one joint attention"
        hint += ", which TGATE cannot cache." if node == "Apply TGATE" else ": use the 'PLADIS Flux Patch' node instead."
    else:
        hint = "It has no cross-attention that this node can patch."
    return ValueError(f"{node} works on {supported}; this model is {name}. {hint}")


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
