"""Measuring the real setup and deciding from what was measured.

* :mod:`.sweep` (with :mod:`.rank0`, :mod:`.calibration`, :mod:`.energy`): batch x CR x bandwidth
  into a performance map (:class:`prism_trt.engines.PerfMap`);
* :mod:`.adaptive`: the latency model fitted from the map, the selector, the plots;
* :mod:`.testbed`: network namespaces joined by tc-shaped veth links to run ranks in (needs root).
"""
