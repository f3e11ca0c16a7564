# Sourced by the scripts that run the pack: sets up the environment (scripts/setup.sh), exports
# COMFYUI_PATH (the ComfyUI in use) and sets VENV (its virtual environment).
COMFYUI_PATH="$(scripts/setup.sh | tail -n 1)"
export COMFYUI_PATH
VENV="$("${PYTHON:-python3}" scripts/comfyui_host.py venv)"
