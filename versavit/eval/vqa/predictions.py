"""VQA predictions in VLMEvalKit's inference-output format (`<model>_<dataset>.tsv`).

What VLMEvalKit writes (GitHub open-compass/VLMEvalKit):

- docs/en/Development.md, "Implement a new benchmark": a benchmark is one TSV whose VQA fields are `index`
  (integer, unique per line), `image` (base64), `question`, `answer` and, for datasets reported per type (MME,
  MMVet), `category`.
- vlmeval/inference.py `infer_data_job`: the prediction file is that TSV with a `prediction` column appended
  (`data['prediction'] = [...]`) and the `image` column dropped (`data.pop('image')`), written by
  `dump(data, result_file)` to `get_pred_file_path(work_dir, model_name, dataset_name)`.
- vlmeval/smp/file.py: `get_pred_file_path` names it `{work_dir}/{model_name}_{dataset_name}.xlsx`, or `.tsv` with
  PRED_FORMAT=tsv; `dump_tsv` writes `data.to_csv(f, sep='\\t', index=False, encoding='utf-8',
  quoting=csv.QUOTE_ALL)`.

So a VQA dataset with index, image, question, answer, category gives the prediction columns `PREDICTION_COLUMNS`;
a multiple-choice dataset (ImageMCQDataset: option columns A, B, ...) keeps its option columns as well, which
VLMEvalKit's MCQ evaluation reads back from the prediction file (`option_columns`: after category, before
prediction; a question without that option leaves the cell empty, NaN to pandas as in the dataset's TSV). The .tsv
variant is written (openpyxl, which the .xlsx needs, is not a dependency here), quoted as `dump_tsv` quotes it;
VLMEvalKit's `load` reads it back (`pd.read_csv(f, sep='\\t')`).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# the dataset TSV's VQA columns without `image`, then the appended `prediction` (see the module docstring)
PREDICTION_COLUMNS: tuple[str, ...] = ("index", "question", "answer", "category", "prediction")


def prediction_file_name(model_name: str, dataset_name: str) -> str:
    """`{model_name}_{dataset_name}.tsv`, as get_pred_file_path names it (path separators replaced)."""
    def safe(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9.+\-]", "-", s)

    return f"{safe(model_name)}_{safe(dataset_name)}.tsv"


def prediction_columns(option_columns: Sequence[str] = ()) -> tuple[str, ...]:
    """PREDICTION_COLUMNS with a multiple-choice dataset's option columns (A, B, ...) before `prediction`."""
    return (*PREDICTION_COLUMNS[:-1], *option_columns, PREDICTION_COLUMNS[-1])


def option_columns_of(options: Iterable[Mapping[str, Any]]) -> list[str]:
    """The option letters any question has, in letter order (the dataset's option columns)."""
    return sorted({str(k) for opts in options for k in (opts or {})})


def write_predictions(path: Path, rows: Iterable[Mapping[str, Any]], option_columns: Sequence[str] = ()) -> Path:
    """Write `rows` (dicts with every column of PREDICTION_COLUMNS; of `option_columns` those a question has) as
    VLMEvalKit's .tsv prediction file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = prediction_columns(option_columns)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        # pandas' to_csv(sep="\t", quoting=QUOTE_ALL): every field quoted, "\n" line ends, the header quoted too
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            missing = [c for c in PREDICTION_COLUMNS if c not in row]
            if missing:
                raise ValueError(f"prediction row lacks {missing}: {dict(row)}")
            writer.writerow([row.get(c, "") for c in columns])
    tmp.replace(path)
    return path


def read_predictions(path: Path) -> list[dict[str, str]]:
    """The rows of a prediction .tsv as strings by column (index included)."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


__all__ = ["PREDICTION_COLUMNS", "option_columns_of", "prediction_columns", "prediction_file_name", "read_predictions",
           "write_predictions"]
