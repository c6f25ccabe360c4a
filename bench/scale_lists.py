"""Lists of K million rows per partner from the generator's 1M-row lists, in seconds.

gen_accounts.py takes minutes per million rows (pure Python); the overlap benchmarks at 4M
and 10M rows per list need the same kind of data, not new randomness. Copy i (i >= 1) of
every row gets a tag of letters put in front of its company's stem, in the name and in the
website alike ("Ulbitac Media Ltd" / "https://www.ulbitac.com" -> "Qzbulbitac Media Ltd" /
"https://www.qzbulbitac.com"), so each copy is a new set of companies with the same
spellings, messiness, statuses and overlap between the partners; copy 0 is the original.
truth.json's counts are multiplied by K (each copy overlaps only its own copy).

    python3 bench/scale_lists.py SRC_DIR DST_DIR K     (SRC_DIR from gen_accounts.py)
"""
import json
import os
import string
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

NAME_START = r"^(\s*(?:[Tt][Hh][Ee]\s+)?\s*)"
SITE_START = r"^(\s*(?:[Hh][Tt][Tt][Pp][Ss]?://)?(?:(?:www|WWW|Www|shop|SHOP|Shop|app|APP|App|eu|EU|Eu|investors|INVESTORS|Investors)\.)?)"


def tag(i):
    # letters only, not a syllable of the generator's (so no copy collides with another)
    return "qz" + string.ascii_lowercase[(i - 1) % 26] * (1 + (i - 1) // 26)


def copy(table, i):
    if i == 0:
        return table
    t = tag(i)
    cols = {}
    for name in table.column_names:
        col = table.column(name)
        if name == "company_name":
            col = pc.replace_substring_regex(col, NAME_START, r"\1" + t.capitalize())
        elif name == "website":
            col = pc.replace_substring_regex(col, SITE_START, r"\1" + t)
        elif name == "account_id":
            col = pc.binary_join_element_wise(col, pa.scalar(f"c{i}"), "-")
        cols[name] = col
    return pa.table(cols, schema=table.schema)


def main():
    src, dst, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if os.path.realpath(src) == os.path.realpath(dst):
        sys.exit("scale_lists.py: the copies must go to another directory")
    os.makedirs(dst, exist_ok=True)
    for f in sorted(os.listdir(src)):
        if not f.endswith(".arrow"):
            continue
        table = ipc.open_file(os.path.join(src, f)).read_all()
        with pa.OSFile(os.path.join(dst, f), "wb") as sink:
            with ipc.new_file(sink, table.schema) as w:
                for i in range(k):
                    for batch in copy(table, i).to_batches(max_chunksize=65536):
                        w.write_batch(batch)
    with open(os.path.join(src, "truth.json")) as fh:
        truth = json.load(fh)

    def scale(v):
        if isinstance(v, dict):
            return {key: scale(x) for key, x in v.items()}
        return v * k if isinstance(v, int) and not isinstance(v, bool) else v

    truth = {key: (scale(v) if key != "seed" else v) for key, v in truth.items()}
    truth["scaled_from"] = {"dir": src, "copies": k}
    with open(os.path.join(dst, "truth.json"), "w") as fh:
        json.dump(truth, fh, indent=2)


if __name__ == "__main__":
    main()
