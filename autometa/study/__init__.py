"""The search: training, the objective, the engine, warm start, devices, budget, worker pool, distributed workers.

(The folder is not called ``search`` so that ``autometa.search`` stays the function.)
"""
