"""What "PLADIS Attention Preview" records in a UNet: an attn2 replace patch that collects maps."""


class CaptureAttn2:
    """attn2 replace patch for UNets: records the layer's maps, then computes the dense attention."""

    def __init__(self, collector, dense_attention):
        self.collector = collector
        self.dense_attention = dense_attention

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        _, _, height, width = extra_options["activations_shape"]
        self.collector.add_projected(q[:1], k[:1], heads, (1, height, width))
        return self.dense_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"))

    def __deepcopy__(self, memo):
        return self  # lives on one clone for one evaluation
