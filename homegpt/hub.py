"""
The Hugging Face hub: is it reachable now, and fetching from it into the local cache (OpenAI's four
GPT-2s by short name, any model repository by owner/name, a dataset split).

    from homegpt.hub import hub_unreachable_reason, load_hub_dataset
    print(hub_unreachable_reason() or "the hub answers")
    rows = load_hub_dataset("tatsu-lab/alpaca", hint="or pass a local JSON file")
    python -c "from homegpt.hub import hub_unreachable_reason; print(hub_unreachable_reason() or 'the hub answers')"

Offline (no route to the hub, or HF_HUB_OFFLINE=1) a name loads from the local Hugging Face cache or
fails at once with what to do, instead of after ~30 s of retries: every reader of the hub asks
hub_unreachable_reason first (GPT-2 weights here, benchmarks in evaluation.py, FineWeb and the
instruction sets in data/*/prepare.py). What the downloaded files mean is hf.py's business.
transformers, huggingface_hub and datasets are imported lazily: the rest of the toolkit runs without them.
"""

import contextlib
import functools
import os
import re
from pathlib import Path

from homegpt.errors import UserError

# ----------------------------------------------------------------------------- models from the hub

# the four checkpoints OpenAI released, by the short names everyone uses -> their hub repository
HF_MODELS = {
    "gpt2": "openai-community/gpt2",  # 124M: n_layer=12, n_head=12, n_embd=768
    "gpt2-medium": "openai-community/gpt2-medium",  # 350M: n_layer=24, n_head=16, n_embd=1024
    "gpt2-large": "openai-community/gpt2-large",  # 774M: n_layer=36, n_head=20, n_embd=1280
    "gpt2-xl": "openai-community/gpt2-xl",  # 1558M: n_layer=48, n_head=25, n_embd=1600
}


def download_gpt2(name):
    """(HF config dict, HF-named tensors, source description) of one of OpenAI's four GPT-2s, by
    short name: through transformers, which keeps it in the local Hugging Face cache."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError as e:
        raise UserError(f"loading {name!r} needs transformers: pip install transformers") from e
    repo = HF_MODELS[name]
    offline = hub_unreachable_reason()
    try:
        # offline, only the local cache is read: it answers at once, where a download would retry
        # for ~30 s before failing
        hf = GPT2LMHeadModel.from_pretrained(repo, local_files_only=offline is not None)
    except OSError as e:  # transformers reports every failed download (DNS, HTTP, no cache) as OSError
        why = (f"the hub is unreachable ({offline}) and it is not in the local Hugging Face cache" if offline
               else f"the download failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
        # no option name here: train.py and sample.py take it as --init_from, eval.py also as --models
        raise UserError(
            f"could not load {name!r} ({repo}) from the Hugging Face hub: {why}.\n"
            f"Instead give a local directory: on a machine with access run "
            f"GPT2LMHeadModel.from_pretrained('{repo}').save_pretrained('{name}-hf'), copy the directory "
            f"over and pass its path in place of {name!r} (e.g. ./{name}-hf)") from e
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    return hf.config.to_dict(), sd, f"{name!r} ({repo})"


HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the hub spells repositories


def snapshot(repo):
    """A hub repository's config.json and weights in the local Hugging Face cache (downloaded when the
    hub answers); its directory. Safetensors are fetched when the repository has them, else the
    pytorch_model*.bin files: never both (GPT-J-6B's float32 .bin alone is 24 GB)."""
    try:
        import huggingface_hub as hf_hub
    except ImportError as e:
        raise UserError(f"loading {repo!r} from the hub needs huggingface_hub: pip install transformers") from e
    offline = hub_unreachable_reason()
    safetensors = ["config.json", "*.safetensors", "model.safetensors.index.json"]
    pickles = ["config.json", "pytorch_model*.bin", "pytorch_model.bin.index.json"]
    try:
        if offline:  # the cache only: whichever format an earlier download left there
            path = Path(hf_hub.snapshot_download(repo, allow_patterns=safetensors + pickles, local_files_only=True))
        else:
            files = hf_hub.list_repo_files(repo)
            has_safetensors = any(f.endswith(".safetensors") for f in files)
            path = Path(hf_hub.snapshot_download(repo, allow_patterns=safetensors if has_safetensors else pickles))
    except (OSError, ValueError) as e:  # huggingface_hub's errors for no cache, 404, auth and network
        why = (f"the hub is unreachable ({offline}) and it is not in the local Hugging Face cache" if offline
               else f"the download failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
        raise UserError(f"could not load {repo!r} from the Hugging Face hub: {why}.\nInstead give a local "
                        f"directory: on a machine with access run huggingface_hub.snapshot_download('{repo}', "
                        f"local_dir='{repo.split('/')[-1]}'), copy it over and pass its path") from e
    return path


# ----------------------------------------------------------------------------- is the hub there?

# huggingface_hub's spelling of "true" for its offline switches (constants._is_true)
_TRUE = ("1", "ON", "YES", "TRUE")
# a round trip to the hub takes well under a second; 3 s leaves room for a slow proxy and still
# fails far faster than the ~30 s of retries it replaces
HUB_PROBE_TIMEOUT = 3.0


def hub_unreachable_reason(timeout=HUB_PROBE_TIMEOUT):
    """None when the Hugging Face hub can be asked now, else why not, in a few words.

    HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set to 1 (or on/yes/true) mean offline without asking.
    Otherwise one HEAD request goes to the hub's endpoint (HF_ENDPOINT), through HTTPS_PROXY and
    friends as urllib reads them, and at most `timeout` seconds are waited, DNS included. Only a
    clear "not there" counts as unreachable (no DNS, connection refused, no route, no answer in
    time); any HTTP answer, even 404 or 503, or a TLS error means something is there, and then the
    real download is tried and reports its own error. Callers fall back to the local cache.
    The answer is kept for the process: eval.py asks once per model and benchmark.
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return f"{var}={os.environ[var]} is set"
    try:
        from huggingface_hub import constants
        endpoint = constants.ENDPOINT
    except ImportError:  # the callers report the missing library themselves
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return _probe(endpoint.rstrip("/"), float(timeout))


def load_hub_dataset(repo, config=None, split="train", hint="", what=None):
    """One split of a dataset on the hub (datasets.load_dataset), or a UserError naming `what` (default
    the repository) that ends with `hint`, how to go on without the hub. When the hub is unreachable
    only the local datasets cache is read, with no request (and no ~30 s of retries) first."""
    what = what or repo
    try:
        import datasets
    except ImportError as e:
        raise UserError(f"reading {what} needs the datasets library: pip install -e .[hf]\n{hint}") from e
    offline = hub_unreachable_reason()
    try:
        with _datasets_offline(datasets, offline is not None):
            return datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # the hub raises connection, HTTP and file errors of many kinds
        why = (f"the hub is unreachable ({offline}) and the split is not in the local datasets cache" if offline
               else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        where = f"{repo}, {config}" if config else repo
        raise UserError(f"could not load {what} from the Hugging Face hub ({where}, split {split}): {why}\n{hint}") from e


@contextlib.contextmanager
def _datasets_offline(datasets, offline):
    """datasets' offline mode for the duration: read from its cache only. It is a flag read at call
    time, set from HF_HUB_OFFLINE at import."""
    if not offline:
        yield
        return
    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before


@functools.lru_cache(maxsize=None)
def _probe(url, timeout):
    import ssl
    import threading
    import urllib.error
    import urllib.request
    answer = []

    def ask():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            answer.append(None)
        except urllib.error.HTTPError:  # an HTTP status, whatever it is, came from a live server
            answer.append(None)
        except urllib.error.URLError as e:
            answer.append(None if isinstance(e.reason, ssl.SSLError) else f"{url}: {e.reason}")
        except ValueError:  # a malformed HF_ENDPOINT: let the library say what it makes of it
            answer.append(None)
        except OSError as e:  # a timeout while reading, a reset connection, a proxy refusing the tunnel
            answer.append(f"{url}: {e or type(e).__name__}")

    # urlopen's timeout does not cover the DNS lookup, which waits out glibc's resolver timeouts
    # (5 s x 2 attempts per nameserver by default) when no resolver answers: a daemon thread bounds
    # the whole probe, and is left to finish on its own
    t = threading.Thread(target=ask, name="hub-probe", daemon=True)
    t.start()
    t.join(timeout)
    return answer[0] if answer else f"{url}: no answer within {timeout:g} s"
