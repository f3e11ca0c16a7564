"""The ComfyUI glue: where PLADIS and TGATE go in each architecture, the patch objects and
host hooks that put them there, and their registration on a ModelPatcher. The math is in
pladis_core/, the node classes in nodes/."""
