"""Neural-network modules built on the deqkit core."""

from ._deq import DEQ as DEQ
from ._deq import DEQWarning as DEQWarning
