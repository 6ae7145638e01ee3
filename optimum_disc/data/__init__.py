"""Data shipped with optimum-disc: the VADER movie-review sentences, labelled by human ratings.

``movieReviewSnippets_GroundTruth.txt`` holds 10,605 sentences of Rotten Tomatoes reviews, each
with the mean rating of about 20 people on a scale from -4 to +4 (Hutto & Gilbert, 2014; MIT
licence, see ``LICENSE`` and ``README.md`` in this folder). :func:`load_movie_reviews` turns it
into a binary sentiment data set: ``label`` is 1 (POSITIVE) when the mean rating is above 0 and
0 (NEGATIVE) when it is below; the 37 sentences rated exactly 0 are dropped, which leaves 10,568.

The train/test split is fixed by a hash of each sentence's ``id`` (80/20), so it does not depend
on the order of the rows or on any random state.

Example:
    >>> from optimum_disc.data import load_movie_reviews
    >>> test = load_movie_reviews("test")
    >>> test.column_names
    ['id', 'text', 'label', 'rating']
    >>> test.features["label"].names
    ['NEGATIVE', 'POSITIVE']
"""

from __future__ import annotations

import hashlib
import logging
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

MOVIE_REVIEWS_FILE = "movieReviewSnippets_GroundTruth.txt"
MOVIE_REVIEWS_ROWS = 10_605  # lines of the file
MOVIE_REVIEWS_NEUTRAL = 37  # of them rated exactly 0, dropped by load_movie_reviews
LABEL_NAMES = ("NEGATIVE", "POSITIVE")
TEST_FRACTION = 0.2
SPLITS = ("train", "test", "all")
_SPLIT_SALT = "optimum-disc/movie-reviews"

CITATION = (
    "Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious Rule-based Model for Sentiment "
    "Analysis of Social Media Text. Eighth International Conference on Weblogs and Social Media "
    "(ICWSM-14). Ann Arbor, MI, June 2014."
)
DESCRIPTION = (
    "VADER movie-review sentences (Rotten Tomatoes snippets of Pang & Lee) with the mean rating "
    "of about 20 human raters from -4 to +4; label 1 (POSITIVE) if the rating is above 0, 0 "
    f"(NEGATIVE) if below; the {MOVIE_REVIEWS_NEUTRAL} sentences rated exactly 0 are dropped."
)


def data_file(name: str) -> Path:
    """The path of a file of this package's data (inside the installed package)."""
    path = resources.files(__name__).joinpath(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"{name!r} is not among optimum-disc's data files in {resources.files(__name__)}; "
            "the installation is incomplete: reinstall optimum-disc."
        )
    return Path(str(path))


def movie_reviews_path() -> Path:
    """The path of the shipped ``movieReviewSnippets_GroundTruth.txt``."""
    return data_file(MOVIE_REVIEWS_FILE)


def read_movie_reviews(path: str | Path | None = None) -> list[tuple[int, float, str]]:
    """Every row of the ground-truth file as ``(id, mean rating, text)``, in file order.

    Args:
        path: another file of the same format (``id<TAB>rating<TAB>text`` per line, CRLF or LF);
            by default the shipped one.
    """
    path = Path(path) if path is not None else movie_reviews_path()
    rows = []
    text = path.read_bytes().decode("utf-8")
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise ValueError(
                f"{path}:{number}: expected 'id<TAB>rating<TAB>text', got {line[:80]!r}; the file "
                "is not in the VADER ground-truth format."
            )
        try:
            row = (int(parts[0]), float(parts[1]), parts[2].strip())
        except ValueError:
            raise ValueError(
                f"{path}:{number}: id {parts[0]!r} or rating {parts[1]!r} is not a number; the "
                "file is not in the VADER ground-truth format."
            ) from None
        rows.append(row)
    return rows


def is_test_id(row_id, test_fraction: float = TEST_FRACTION) -> bool:
    """Whether the row with this id belongs to the test split (a fixed hash of the id)."""
    digest = hashlib.sha256(f"{_SPLIT_SALT}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def split_by_id(dataset, test_fraction: float = TEST_FRACTION, id_column: str = "id"):
    """Split a data set into ``train`` and ``test`` by a hash of ``id_column``.

    The split of a row depends on its id only, so it is the same whatever the order or the
    subset of the rows, on every machine.

    Returns:
        A ``datasets.DatasetDict`` with ``train`` and ``test``.
    """
    import datasets

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must be between 0 and 1 (exclusive).")
    if id_column not in dataset.column_names:
        raise ValueError(
            f"id_column={id_column!r} is not a column of the data set; its columns are "
            f"{dataset.column_names}."
        )
    ids = list(dataset[id_column])
    test = [i for i, row_id in enumerate(ids) if is_test_id(row_id, test_fraction)]
    test_set = set(test)
    train = [i for i in range(len(ids)) if i not in test_set]
    return datasets.DatasetDict(train=dataset.select(train), test=dataset.select(test))


def load_movie_reviews(split: str | None = "all"):
    """The movie-review sentences as a binary sentiment ``datasets.Dataset``.

    Columns: ``id`` (int, the line's id in the source file), ``text``, ``label`` (a ``ClassLabel``
    with names ``NEGATIVE`` / ``POSITIVE``: 1 if the mean rating is above 0, 0 if below) and
    ``rating`` (the mean human rating, -4 to +4). The 37 sentences whose mean rating is exactly 0
    are dropped (logged), leaving 10,568 rows: 8,518 train and 2,050 test.

    Args:
        split: ``"all"`` (or None), ``"train"`` (about 80%) or ``"test"`` (about 20%), fixed by a
            hash of the id (see :func:`split_by_id`).

    Returns:
        A ``datasets.Dataset`` in the order of the file, held in memory.
    """
    import datasets

    split = "all" if split is None else split
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a split of movie-reviews; use one of {SPLITS}.")
    rows = read_movie_reviews()
    kept = [r for r in rows if r[1] != 0.0]
    logger.info(
        "movie-reviews: %d sentences, %d rated exactly 0 dropped, %d kept",
        len(rows),
        len(rows) - len(kept),
        len(kept),
    )
    if split != "all":
        kept = [r for r in kept if is_test_id(r[0]) == (split == "test")]
    features = datasets.Features(
        {
            "id": datasets.Value("int64"),
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(LABEL_NAMES)),
            "rating": datasets.Value("float64"),
        }
    )
    info = datasets.DatasetInfo(
        description=DESCRIPTION,
        citation=CITATION,
        homepage="https://github.com/cjhutto/vaderSentiment",
        license="MIT",
        features=features,
    )
    return datasets.Dataset.from_dict(
        {
            "id": [r[0] for r in kept],
            "text": [r[2] for r in kept],
            "label": [int(r[1] > 0) for r in kept],
            "rating": [r[1] for r in kept],
        },
        features=features,
        info=info,
        split=split if split != "all" else None,
    )


__all__ = [
    "CITATION",
    "LABEL_NAMES",
    "MOVIE_REVIEWS_FILE",
    "data_file",
    "is_test_id",
    "load_movie_reviews",
    "movie_reviews_path",
    "read_movie_reviews",
    "split_by_id",
]
