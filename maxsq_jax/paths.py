"""Where outputs and weights live: a local path or a `gs://BUCKET/...` URL, both as an
`etils.epath.Path` (the path type Orbax uses; gs:// goes through gcsfs).

Local paths are made absolute; gs:// URLs are kept as they are; any other scheme is refused.
Training data is not read through this layer: it must be on a local or mounted file system.
"""

import errno
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


def make_dir(path, what: str = "path") -> None:
  """Creates the local directory `path` (and its parents) unless it exists, and checks that it can be
  written; PathError naming it, what it is and the fix otherwise (a file, a symbolic link that leads
  nowhere, a name over the file system's limit, a read-only or forbidden place). A gs:// URL needs
  no directory and is not checked here (check_reachable)."""
  if is_remote(path):
    return
  text = os.fspath(path)
  if os.path.islink(text) and not os.path.exists(text):
    raise PathError(f"{what}={text}: {not_a_directory(text)}; remove or fix the link, or give another directory")
  if os.path.exists(text) and not os.path.isdir(text):
    raise PathError(f"{what}={text} is a file, not a directory; give a directory (a new name is created)")
  try:
    os.makedirs(text, exist_ok=True)
  except OSError as e:
    raise PathError(f"{what}={text}: cannot create it: {os_error_reason(e, text)}") from None
  if not os.access(text, os.W_OK | os.X_OK):
    readonly = os.statvfs(text).f_flag & os.ST_RDONLY
    reason = "it is on a read-only file system" if readonly else "this user may not write in it (permissions)"
    raise PathError(f"{what}={text}: {reason}; give a directory you can write to")


def not_a_directory(path: str) -> str:
  """What local `path`, which is not a directory, is: 'a symbolic link loop (...)', 'a symbolic link to
  X, which does not exist', 'a file, not a directory' or 'does not exist'."""
  if os.path.islink(path) and not os.path.exists(path):
    try:
      os.stat(path)
    except OSError as e:
      if e.errno == errno.ELOOP:
        return f"a symbolic link loop ({path} -> {os.readlink(path)} -> ... never reaches a directory)"
    return f"a symbolic link to {os.readlink(path)}, which does not exist"
  if os.path.exists(path):
    return "a file, not a directory"
  return "does not exist"


def os_error_reason(error: OSError, path: str) -> str:
  """The cause of an OSError about `path` in words, with the fix."""
  name = error.filename or path
  if error.errno == errno.ENAMETOOLONG:
    limit = os.pathconf("/", "PC_NAME_MAX")
    longest = max(os.fspath(path).split(os.sep), key=lambda part: len(part.encode()))
    return (f"the name {longest[:24]}... is {len(longest.encode())} bytes, over the file system's limit of {limit} "
            "bytes per name (NAME_MAX); use a shorter name")
  if error.errno in (errno.EACCES, errno.EPERM):
    return f"permission denied for {name}; give a directory you can write to, or change the permissions"
  if error.errno == errno.EROFS:
    return f"{name} is on a read-only file system; give a directory on a writable one"
  if error.errno == errno.ENOTDIR:
    return f"a part of {name} is a file, not a directory"
  if error.errno == errno.ELOOP:
    return f"a symbolic link in {name} loops; fix the link"
  if error.errno in (errno.ENOSPC, errno.EDQUOT):
    return f"the disk holding {name} is full; free space or give a directory on another disk"
  return f"{error.strerror or error} ({name})"
