# IPython runs this when the notebook's kernel starts, before the first cell: fast.ai v1 then
# reports its progress and its per-epoch table as plain text, which papermill passes on to the
# run's log (and trainrig's metric patterns), instead of HTML widgets only a browser shows.
try:
    from fastprogress import fastprogress
except ImportError:
    pass
else:
    fastprogress.master_bar, fastprogress.progress_bar = fastprogress.force_console_behavior()
