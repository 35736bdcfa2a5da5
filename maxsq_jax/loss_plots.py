"""PNG plots of the gradient analysis (matplotlib, Agg backend: no display needed).

* `plot_curves`: 2 x 2 panels, |dL/dp| (top) and ||dL/dlogits|| (bottom) against the probability of
  the predicted class, for a 2-class (left) and a C-class (right) pixel; one line per loss.
* `plot_confidence`: share of the total gradient per confidence bin (bars per loss, the share of
  pixels in grey) and the mean per-pixel gradient norm per bin (log scale).
* `plot_classes`: share of the total gradient per predicted class for each loss, next to the share
  of pixels.
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PIXEL_COLOUR = "0.6"


def _save(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def plot_curves(path: str, curves: dict, num_classes: int) -> None:
  """curves: {"two_class": {"p": [N], "num_classes": 2, label: {"dloss_dp": [N], "dloss_dlogits_norm": [N]}},
  "c_class": {...}} (analyze_loss.curve_numbers)."""
  fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex="col", sharey="row")
  for col, (key, title) in enumerate((("two_class", "2-class pixel"),
                                      ("c_class", f"{num_classes}-class pixel, the rest spread evenly"))):
    data = curves[key]
    p = np.asarray(data["p"])
    for label, values in data.items():
      if label in ("p", "num_classes"):
        continue
      for row, quantity in enumerate(("dloss_dp", "dloss_dlogits_norm")):
        y = np.abs(np.asarray(values[quantity], np.float64))
        axes[row, col].plot(p, np.where(y > 0, y, np.nan), label=label, linewidth=1.8)
    axes[0, col].set_title(title)
    axes[1, col].set_xlabel("probability p of the predicted class (logit scale)")
    for row in range(2):
      ax = axes[row, col]
      ax.set_xscale("logit")
      ax.set_yscale("log")
      ax.grid(True, which="major", alpha=0.3)
  axes[0, 0].set_ylabel("|dL/dp|  (gradient w.r.t. p)")
  axes[1, 0].set_ylabel("||dL/dlogits||  (gradient w.r.t. the logits)")
  axes[0, 1].legend(loc="best", fontsize=9)
  fig.suptitle("Gradient of each target loss on one pixel (as training sees it, before lambda_T)")
  _save(fig, path)


def _bar_groups(ax, names, series: dict, reference=None, reference_label="share of pixels"):
  """Grouped bars: one group per name, one bar per series; `reference` as grey bars first."""
  keys = ([reference_label] if reference is not None else []) + list(series)
  width = 0.8 / max(len(keys), 1)
  x = np.arange(len(names))
  for i, key in enumerate(keys):
    values = reference if key == reference_label and reference is not None else series[key]
    values = np.asarray([np.nan if v is None else v for v in values], np.float64)
    kwargs = {"color": PIXEL_COLOUR} if key == reference_label and reference is not None else {}
    ax.bar(x - 0.4 + (i + 0.5) * width, values, width, label=key, **kwargs)
  ax.set_xticks(x)
  ax.set_xticklabels(names, rotation=45, ha="right")


def _bin_names(bins) -> list[str]:
  return [f"[{lo:g}, {hi:g})" if hi < 1 else f"[{lo:g}, 1]" for lo, hi in bins]


def plot_confidence(path: str, summary: dict, title: str) -> None:
  names = _bin_names(summary["bins"])
  losses = summary["losses"]
  fig, axes = plt.subplots(1, 2, figsize=(14, 5))
  _bar_groups(axes[0], names, {k: v["share_per_bin"] for k, v in losses.items()}, summary["pixel_share_per_bin"])
  axes[0].set_ylabel("share of the total gradient (sums to 1 per loss)")
  axes[0].set_xlabel("confidence bin: max_c p of the pixel")
  axes[0].legend(fontsize=9)
  axes[0].set_title("Where the gradient comes from")
  _bar_groups(axes[1], names, {k: v["mean_norm_per_bin"] for k, v in losses.items()})
  axes[1].set_yscale("log")
  axes[1].set_ylabel("mean per-pixel ||dL/dlogits||")
  axes[1].set_xlabel("confidence bin: max_c p of the pixel")
  axes[1].set_title("Gradient per pixel")
  fig.suptitle(title)
  _save(fig, path)


def plot_classes(path: str, summary: dict, title: str) -> None:
  names = list(summary["pixel_share_per_class"])
  losses = summary["losses"]
  fig, ax = plt.subplots(figsize=(min(16, max(8, 0.9 * len(names))), 5))
  _bar_groups(ax, names, {k: [v["share_per_class"][n] for n in names] for k, v in losses.items()},
              [summary["pixel_share_per_class"][n] for n in names])
  ax.set_yscale("log")
  ax.set_ylabel("share of the total gradient (log scale)")
  ax.set_xlabel("predicted class")
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  ax.set_title(title)
  _save(fig, path)
