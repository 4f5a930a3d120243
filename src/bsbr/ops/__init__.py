"""Pure tensor functions: the reference, parallel and recurrent forms of each mechanism, side by side.

    bsbr.py      BSBR, multi-head and grouped-query (scaling, gate, sinks, windows, compression): bsbr_reference
                 (token loop), bsbr_parallel (chunked, continues a stream), bsbr_step (one token per row)
    bsbr_chunked.py  the chunked form's pieces: local attention, the mixture, the row kernel, the non-finite guard
    softmax.py   causal softmax attention: reference (explicit mask) and fused (SDPA)
    linear.py    linear attention: linear_recurrent (token recurrence) and linear_chunkwise
    deltanet.py  DeltaNet: delta_recurrent (token recurrence), delta_chunkwise (WY/UT form), ut_transform, chunk_states
    window.py    sliding-window attention: window_attention_reference (dense band) and window_attention (blocked)
    gau.py       GAU's mixed chunk attention: gau_dense (reference) and gau_mixed (chunked, continues from a state)
    hopfield.py  Hopfield association: association_reference (explicit mask) and association (SDPA)
    rope.py      rotary position embeddings (computed from positions; tables cached per length, dtype, device)
    nonfinite.py keeping NaN and inf where they are: masked sums for the references, finite/non-finite value splits
                 and first-non-finite cuts for the fast forms (no masked value enters a product)

Layers (``bsbr.layers``) own the weights and caches and pick the form; nothing here holds state.
"""
