"""
Hate Speech and Offensive Language (Davidson et al. 2017) as a small SFT classification task:
1,000 training and 200 class-balanced validation tweets, {"prompt", "completion"} JSONL.

    python data/hate_speech/prepare.py                               # the hub -> data/hate_speech/
    python data/hate_speech/prepare.py --input=labeled_data.csv      # a local copy, no network
    python train.py --init_from=gpt2 --out_dir=out-hate-speech \
        --sft_train_file=data/hate_speech/train.jsonl --sft_val_file=data/hate_speech/val.jsonl
    python eval.py --out_dir=out-hate-speech --tasks=generate --data_file=data/hate_speech/val.jsonl --max_new_tokens=4

Source: 24,783 tweets labelled by CrowdFlower workers, `class` 0 hate speech (1,430), 1 offensive
language (19,190), 2 neither (4,163). The Hugging Face hub's tdavidson/hate_speech_offensive (split
'train'), or --input: the original labeled_data.csv of github.com/t-davidson/hate-speech-and-offensive-language
(columns `,count,hate_speech,offensive_language,neither,class,tweet`), or a JSONL file / JSON array of
objects with at least `tweet` and `class`. A name ending in .csv is read as CSV, anything else as JSON.
Offline (the hub unreachable, or HF_HUB_OFFLINE=1) without --input it reads the local datasets cache, else stops at once and says so.

Protocol, one random.Random(seed) for all draws, over the rows in input order:
1. validation first, balanced: val_size // 3 tweets per class, the remainder one each to the lowest
   class ids, so 200 -> hate 67, offensive 67, neutral 66 (class 2 is the one that gets fewer);
2. training from the remaining rows, uniformly at random (so it keeps the corpus' imbalance,
   ~77% offensive): 1,000 rows, no row in both splits. (A tweet text repeated in the corpus may
   still land in both, as two rows.)
The same input and seed give the same bytes. Validation is balanced so that each class's accuracy
rests on ~67 answers; with the natural mix, ~12 hate tweets would decide it.

Each row becomes {"prompt": template.format(text=tweet), "completion": " " + label}, the tweet's
whitespace collapsed (" ".join(tweet.split()): tweets hold newlines and runs of spaces), which
sft.py trains on and `eval.py --tasks=generate` scores. split.json records the source, the sha256 of
a local input, the seed, template, labels and the counts per split and class. Nothing is written
unless every row is valid and every class has enough examples; each file is written atomically.
"""

import csv
import json
import random
import string
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the checkout: its modules are not installed

from homegpt.errors import MissingFile, UserError, many_errors  # noqa: E402
from configurator import parse_list, run  # noqa: E402
from homegpt.fileio import check_dir_target, file_sha256, write_json, write_json_lines  # noqa: E402

HUB = "tdavidson/hate_speech_offensive"
CSV_URL = "https://github.com/t-davidson/hate-speech-and-offensive-language/raw/master/data/labeled_data.csv"
N_CLASSES = 3  # Davidson et al.'s classes: 0 hate speech, 1 offensive language, 2 neither


@dataclass
class PrepareConfig:
    input: str = ""  # local labeled_data.csv, JSONL or JSON array (tweet, class); '' = the Hugging Face hub
    out_dir: str = str(HERE)  # where train.jsonl, val.jsonl and split.json go
    seed: int = 0  # every draw (validation, then training) comes from random.Random(seed)
    train_size: int = 1000  # drawn uniformly from the rows left after validation
    val_size: int = 200  # class-balanced: 67 / 67 / 66 at 200
    # the prompt, a format string with the one field {text} (the tweet, whitespace collapsed)
    template: str = "Classify the tweet as hate, offensive or neutral.\nTweet: {text}\nLabel:"
    labels: str = "hate,offensive,neutral"  # the completions for class 0, 1, 2 (each written as " " + label)


def template_problem(template):
    """None when template uses the field {text} and no other, else what is wrong with it."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        if set(fields) != {"text"}:
            return f"has the fields {fields}"
        template.format(text="")  # a field nested in a format spec ({text:{width}}) only fails here
    except (ValueError, KeyError, IndexError) as e:  # a lone brace, {text:{width}}
        return f"is not a valid format string ({type(e).__name__}: {e})"
    return None


def check_config(cfg):
    """Every problem with the knobs at once; returns the three label names."""
    errors = []
    problem = template_problem(cfg.template)
    if problem:
        errors.append(f"--template={cfg.template!r} {problem}: it must use the field {{text}} (the tweet) and no "
                      f"other; write a literal brace as {{{{ or }}}}")
    labels = parse_list(cfg.labels)
    if len(labels) != N_CLASSES or len(set(labels)) != N_CLASSES:
        errors.append(f"--labels={cfg.labels!r} must name {N_CLASSES} different labels, comma-separated, "
                      f"for class 0 (hate speech), 1 (offensive language) and 2 (neither)")
    if cfg.train_size < 1 or cfg.val_size < N_CLASSES:
        errors.append(f"--train_size={cfg.train_size} and --val_size={cfg.val_size} must be at least 1 and "
                      f"{N_CLASSES} (one validation tweet per class)")
    if errors:
        raise UserError("\n  ".join(errors))
    return labels


# ----------------------------------------------------------------------------- reading the rows

def read_local(path):
    """[(row name, raw record)] from labeled_data.csv (by the .csv suffix), a JSON array or JSONL."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"--input={path}: no such file; give labeled_data.csv ({CSV_URL}) or a JSONL file "
                          f"with tweet and class fields")
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as f:  # newline="": tweets hold quoted newlines
                reader = csv.DictReader(f)
                missing = {"tweet", "class"} - set(reader.fieldnames or ())
                if missing:
                    raise UserError(f"{path}: the CSV header {reader.fieldnames} lacks {sorted(missing)}; expected "
                                    f"labeled_data.csv's ',count,hate_speech,offensive_language,neither,class,tweet'")
                # the header line is line 1; a tweet's quoted newlines make line numbers drift, row numbers don't
                return [(f"row {i}", r) for i, r in enumerate(reader, 1)]
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e})") from e
    if text.lstrip().startswith("["):
        try:
            return [(f"record {i}", r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from e
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); a file not ending in .csv is read "
                                f"as JSONL or a JSON array") from e
    return rows


def read_hub():
    """[(row name, record)] of the hub's copy; offline, the datasets cache or a stop pointing to --input."""
    hint = (f"Instead pass a local copy: --input=labeled_data.csv, downloaded from {CSV_URL}, or a JSONL "
            f"file saved on a machine with access by datasets.load_dataset('{HUB}', split='train')"
            f".to_json('hate_speech.jsonl')")
    from homegpt.hub import load_hub_dataset  # the same reachability check as GPT-2 weights, benchmarks and FineWeb
    ds = load_hub_dataset(HUB, split="train", hint=hint)
    return [(f"row {i}", {"tweet": t, "class": c}) for i, (t, c) in enumerate(zip(ds["tweet"], ds["class"]))]


def check_rows(rows, where):
    """[(tweet with whitespace collapsed, class int)]; one UserError lists the bad rows."""
    out, errors = [], []
    for name, r in rows:
        if not isinstance(r, dict):
            errors.append(f"{name}: expected an object with tweet and class, got {type(r).__name__}")
            continue
        tweet, label = r.get("tweet"), r.get("class")
        try:  # CSV gives "2", JSON 2; bools and floats like 1.5 are not classes
            cls = int(label.strip()) if isinstance(label, str) else label
        except ValueError:
            cls = None
        if isinstance(cls, bool) or cls not in range(N_CLASSES):
            errors.append(f"{name}: class {label!r} is not 0, 1 or 2")
        elif not isinstance(tweet, str) or not tweet.split():
            errors.append(f"{name}: tweet {tweet!r} is missing or empty")
        else:
            out.append((" ".join(tweet.split()), cls))
    if errors:
        raise many_errors(f"{where}: {len(errors)} bad row(s) of {len(rows):,}; each needs a non-empty tweet "
                          f"and a class 0 (hate), 1 (offensive) or 2 (neither)", errors)
    if not out:
        raise UserError(f"{where}: holds no rows")
    return out


# ----------------------------------------------------------------------------- the split

def val_quota(val_size):
    """Tweets per class in validation: as equal as possible, the remainder to the lowest class ids."""
    return [val_size // N_CLASSES + (c < val_size % N_CLASSES) for c in range(N_CLASSES)]


def split(classes, train_size, val_size, seed, names):
    """(train indices, val indices) into the rows whose class ids are `classes`: validation drawn
    class by class, then training uniformly from the rest; both in a seeded random order."""
    by_class = [[i for i, c in enumerate(classes) if c == k] for k in range(N_CLASSES)]
    quota = val_quota(val_size)
    short = [f"{names[k]} (class {k}): {len(by_class[k]):,} rows, validation needs {quota[k]}"
             for k in range(N_CLASSES) if len(by_class[k]) < quota[k]]
    if short:
        raise UserError(f"too few examples of a class for a balanced validation set of {val_size}: "
                        + "; ".join(short) + ". Lower --val_size or give the whole dataset")
    rng = random.Random(seed)
    val = [i for k in range(N_CLASSES) for i in rng.sample(by_class[k], quota[k])]
    rng.shuffle(val)  # mix the classes; the draws above fixed which rows
    taken = set(val)
    rest = [i for i in range(len(classes)) if i not in taken]
    if len(rest) < train_size:
        raise UserError(f"too few examples: {len(classes):,} rows, {val_size} for validation leave {len(rest):,}, "
                        f"fewer than --train_size={train_size:,}")
    return rng.sample(rest, train_size), val


def main(cfg):
    labels = check_config(cfg)
    check_dir_target(cfg.out_dir, "--out_dir")  # never into a run; a read-only place is refused before any work
    if cfg.input:
        path = Path(cfg.input)
        rows, source, sha = read_local(path), str(cfg.input), file_sha256(path)
    else:
        print(f"loading {HUB} from the Hugging Face hub ...")
        rows, source, sha = read_hub(), f"hf://datasets/{HUB}", None
    rows = check_rows(rows, source)
    train, val = split([c for _, c in rows], cfg.train_size, cfg.val_size, cfg.seed, labels)

    out_dir = Path(cfg.out_dir)
    counts = {}
    for name, idx in (("train", train), ("val", val)):
        records = [{"prompt": cfg.template.format(text=rows[i][0]), "completion": " " + labels[rows[i][1]]}
                   for i in idx]
        write_json_lines(out_dir / f"{name}.jsonl", records)
        counts[name] = {labels[k]: sum(rows[i][1] == k for i in idx) for k in range(N_CLASSES)}
    counts["input"] = {labels[k]: sum(c == k for _, c in rows) for k in range(N_CLASSES)}
    write_json(out_dir / "split.json", {"source": source, "sha256": sha, "rows": len(rows), "seed": cfg.seed,
                                        "template": cfg.template, "labels": labels, "counts": counts})
    show = lambda c: ", ".join(f"{label} {n:,}" for label, n in c.items())
    print(f"{len(rows):,} tweets from {source} ({show(counts['input'])})\n"
          f"-> train {len(train):,} ({show(counts['train'])}), val {len(val):,} ({show(counts['val'])}) in {out_dir}")
    return counts


if __name__ == "__main__":
    run(main, PrepareConfig)
