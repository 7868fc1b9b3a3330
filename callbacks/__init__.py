"""Monitoring callbacks for the r1v3 stages (installed as ``r1v3.callbacks``)."""

from r1v3.callbacks.checkpoint import RankedCheckpoint
from r1v3.callbacks.critical_entropy import CriticalTokenEntropy
from r1v3.callbacks.hallucination import HallucinationMonitor
from r1v3.callbacks.kl_monitor import KLMonitor
from r1v3.callbacks.lr_alarm import LRInstabilityAlarm
from r1v3.callbacks.progress import StepProgressBar
from r1v3.callbacks.rollback import Rollback

__all__ = ["CriticalTokenEntropy", "HallucinationMonitor", "KLMonitor", "LRInstabilityAlarm", "RankedCheckpoint",
           "Rollback", "StepProgressBar"]
