"""NCI Imaging Data Commons (TCIA's radiology collections): catalog, split planner, downloads, and a source.

- :mod:`~modality.sources.idc.catalog` reads the series index bundled with idc-index (offline);
- :mod:`~modality.sources.idc.plan` assigns whole collections to train / val / test under checked constraints;
- :mod:`~modality.sources.idc.download` fetches the planned series with s5cmd and lists them as InputItems.
"""

from modality.sources.idc.catalog import read_index, select_image_series, summarise_catalog
from modality.sources.idc.plan import Plan, PlanConstraints, PlanInfeasible, check_plan, plan_collections

__all__ = [
    "Plan",
    "PlanConstraints",
    "PlanInfeasible",
    "check_plan",
    "plan_collections",
    "read_index",
    "select_image_series",
    "summarise_catalog",
]
