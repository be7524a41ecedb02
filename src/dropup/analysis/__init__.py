"""Looking inside models: expert similarity (`dropup inspect`), routing statistics, reports."""
