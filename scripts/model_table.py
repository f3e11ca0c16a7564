"""The README's table of supported models, made from the pack's architecture table.

    .venv/bin/python scripts/model_table.py          print it
    .venv/bin/python scripts/model_table.py --write  put it into README.md between its markers
"""
import sys
from pathlib import Path

PACK = Path(__file__).resolve().parent.parent
START, END = "<!-- model table: made by scripts/model_table.py -->", "<!-- end of the model table -->"


def readme_with(table, readme):
    before, _, rest = readme.partition(START)
    _, _, after = rest.partition(END)
    return f"{before}{START}\n{table}\n{END}{after}"


def main(argv):
    sys.path.insert(0, str(PACK / "tests"))
    from host import loaded

    table = loaded().pack_module("pladis_comfy.architectures").model_table()
    if "--write" in argv:
        readme = PACK / "README.md"
        readme.write_text(readme_with(table, readme.read_text()))
    else:
        print(table)


if __name__ == "__main__":
    main(sys.argv)
