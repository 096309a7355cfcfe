import os
import tempfile

os.environ.setdefault("GRAPHTUNE_DB", os.path.join(tempfile.mkdtemp(prefix="graphtune-bench-"), "tuning.db"))
