"""Figures of the study (matplotlib/seaborn). Every function returns its Figure; notebooks show and save it.

One module per part of the study; everything is re-exported here, so ``from vericar import plots`` and
``plots.class_count_figure(...)`` is all a notebook needs.
"""

import seaborn as _sns

_sns.set_theme(style="whitegrid", context="notebook")

# Figures shown inline in the notebooks: modest resolution, so that an executed notebook stays under 2 MB (the
# published study commits them); the files in figures/ are saved at their own dpi (vericar.results.save_figure).
import matplotlib as _mpl  # noqa: E402

_mpl.rcParams["figure.dpi"] = 72

from .eda import *  # noqa: E402,F401,F403
from .embedding import *  # noqa: E402,F401,F403
from .errors import *  # noqa: E402,F401,F403
from .gradients import *  # noqa: E402,F401,F403
from .hierarchy import *  # noqa: E402,F401,F403
from .identify import *  # noqa: E402,F401,F403
from .ood import *  # noqa: E402,F401,F403
from .training import *  # noqa: E402,F401,F403
