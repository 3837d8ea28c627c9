"""How studies report: one writer of files (:mod:`.tables`), one plot style (:mod:`.plots`), one
printer and one progress bar (:mod:`.console`), the audit's HTML page (:mod:`.html`) and contact
sheets of cells (:mod:`.contact`). Nothing here knows a particular study."""
