"""Where outputs and weights live: a local path or a `gs://BUCKET/...` URL, both as an
`etils.epath.Path` (the path type Orbax uses; gs:// goes through gcsfs).

Local paths are made absolute; gs:// URLs are kept as they are; any other scheme is refused.
Training data is not read through this layer: it must be on a local or mounted file system.
"""

import os
import time
import urllib.error
import urllib.request

from etils import epath

from maxsq_jax.errors import MaxsqError

GCS_ENDPOINT = "https://storage.googleapis.com"
MOUNT_HINT = ("mount the bucket read-only (launch/tpu_vm.sh install mounts $BUCKET at /mnt/BUCKET on every "
              "worker with gcsfuse) and give the mounted path")


class PathError(MaxsqError, ValueError):
  """A path or URL that cannot be used; the message names it and what to do."""


def _scheme(path) -> str:
  scheme, sep, _ = os.fspath(path).partition("://")
  return scheme if sep else ""


def is_remote(path) -> bool:
  """Whether `path` is a gs:// URL."""
  return _scheme(path) == "gs"


def resolve(path, what: str = "path") -> epath.Path:
  """`path` as an epath.Path: a local path made absolute, or a gs:// URL. `what` names the flag or
  config key in the error raised for any other scheme (s3://, http://, ...)."""
  text = os.fspath(path)
  scheme = _scheme(text)
  if not scheme:
    return epath.Path(os.path.abspath(text))
  if scheme == "gs":
    if not bucket_of(text):
      raise PathError(f"{what}={text}: no bucket name; write gs://BUCKET/PATH")
    return epath.Path(text)
  raise PathError(f"{what}={text}: the {scheme}:// scheme is not supported; give a local path or a "
                  "gs://BUCKET/PATH URL")


def bucket_of(url) -> str:
  """"my-bucket" of "gs://my-bucket/runs/x"."""
  return os.fspath(url)[len("gs://"):].split("/", 1)[0]


def storage_endpoint() -> str:
  """The Cloud Storage server gcsfs talks to: $STORAGE_EMULATOR_HOST if set, else Google's."""
  return os.environ.get("STORAGE_EMULATOR_HOST") or GCS_ENDPOINT


def check_reachable(path, what: str = "path", attempts: int = 3, timeout_s: float = 10.0) -> None:
  """For a gs:// URL: the storage server answers an HTTP request within `timeout_s` (`attempts`
  tries, 1 s then 2 s apart; any HTTP status counts as an answer) and the bucket exists. Raises
  PathError naming the URL otherwise; a local path is not checked."""
  if not is_remote(path):
    return
  endpoint = storage_endpoint().rstrip("/")
  if "://" not in endpoint:
    endpoint = f"http://{endpoint}"
  bucket = bucket_of(path)
  for attempt in range(attempts):
    try:
      urllib.request.urlopen(f"{endpoint}/storage/v1/b/{bucket}", timeout=timeout_s).close()
      break
    except urllib.error.HTTPError:  # 401 without credentials, 404 for a missing bucket: it answers.
      break
    except OSError as e:  # Refused, unreachable, timed out (URLError and TimeoutError are OSErrors).
      error = e
      if attempt + 1 < attempts:
        time.sleep(2 ** attempt)
  else:
    reason = getattr(error, "reason", error) or type(error).__name__
    raise PathError(f"{what}={path}: the storage server {endpoint} does not answer ({attempts} tries; {reason}); "
                    "check the network, or STORAGE_EMULATOR_HOST if it is set")
  bucket = bucket_of(path)
  try:
    exists = epath.Path(f"gs://{bucket}").exists()
  except Exception as e:  # Credentials, permissions: gcsfs and google-auth raise many types.
    raise PathError(f"{what}={path}: cannot read bucket gs://{bucket} at {endpoint} "
                    f"({type(e).__name__}: {e}); check the credentials (gcloud auth application-default login)") from e
  if not exists:
    raise PathError(f"{what}={path}: the bucket gs://{bucket} does not exist (or this account cannot see it); "
                    f"create it (gcloud storage buckets create gs://{bucket}) or fix the URL")


def require_local(path, what: str) -> None:
  """Refuses a URL where a local (or mounted) directory is needed: training data."""
  if _scheme(path):
    raise PathError(f"{what}={path}: training data is read from a local or mounted file system, not a URL; "
                    f"{MOUNT_HINT}")
