"""The federation base shared by the bulk pipeline and the screens.

- :mod:`~fed_de.federation.messages`: typed messages (what a site sends), their schemas and sums;
- :mod:`~fed_de.federation.calls`: step functions as plan entries (site steps, aggregator steps);
- :mod:`~fed_de.federation.strategy`: the substrafl strategy base with one local and one
  aggregation method that run the step functions the plan names, and the plan cursor.
"""
