"""The weak-supervision network (MONAI's DynUNet) built from a model config: shared by training (weak.py)
and inference (predict.py), which therefore need not import each other."""

from ..errors import optional_import


def build_network(config):
    """DynUNet from a model config (its "dims", "classes" and "network" plan)."""
    nets = optional_import("monai.networks.nets", "train", "weak supervision")
    plan = config["network"]
    return nets.DynUNet(
        spatial_dims=config["dims"], in_channels=1, out_channels=config["classes"],
        kernel_size=plan["kernel_size"], strides=plan["strides"], upsample_kernel_size=plan["strides"][1:],
        filters=plan["filters"], norm_name=("INSTANCE", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision=plan["deep_supr_num"] > 0, deep_supr_num=max(1, plan["deep_supr_num"]))
