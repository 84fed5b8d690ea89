"""Who chooses each step's compute: the controllers, registered by name, and their budget accounting.

* :mod:`~soljax.control.given`: raw controls or action ids given in advance (baselines, experiments);
* :mod:`~soljax.control.policy`: the SOL policy (:mod:`~soljax.control.network`) as a controller;
* :mod:`~soljax.control.heuristics`: EMC and DAC, budget-matched handcrafted allocation;
* :mod:`~soljax.control.baselines`: budget-matched fixed and random schedules (numpy);
* :mod:`~soljax.control.budget`: action costs, axis levels, the budget guard's feasibility tests and
  the targets it cannot cap.

Every controller implements :class:`soljax.engine.observe.Controller`.
"""

from soljax.control.baselines import block_phases, bracket, fixed_schedule, random_schedule
from soljax.control.budget import action_costs, axis_levels, check_guard_targets, within_budget, within_running_budget
from soljax.control.given import GivenActions, GivenControls, GridController, constant_controls
from soljax.control.heuristics import DriftController, EntropyMarginController
from soljax.control.network import PolicyConfig, SOLPolicy, init_policy
from soljax.control.policy import PolicyController
from soljax.control.registry import CONTROLLERS, make_controller, register_controller

__all__ = [
    "CONTROLLERS", "DriftController", "EntropyMarginController", "GivenActions", "GivenControls",
    "GridController", "PolicyConfig", "PolicyController", "SOLPolicy", "action_costs", "axis_levels",
    "block_phases", "bracket", "check_guard_targets", "fixed_schedule", "init_policy", "make_controller",
    "random_schedule", "register_controller", "within_budget", "within_running_budget",
]
