"""Data: synthetic universes, datasets on disk and in memory, batch sources and the
epoch sampler, CosmoFlow's and the digits' data; graphs with exact betweenness labels
and ranking features (`graphs`)."""
