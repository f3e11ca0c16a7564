"""PLADIS and TGATE in plain torch: the math and the patch objects, no ComfyUI import."""
