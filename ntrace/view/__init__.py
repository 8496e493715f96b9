"""``ntrace view``: a live web page over traces while they are written (``pip install
'ntrace[view]'``). Imported only by that command: the rest of ntrace never imports Bokeh."""
