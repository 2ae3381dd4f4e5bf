"""Run tables and the reference study's figures, as PNG files and one self-contained HTML page."""
