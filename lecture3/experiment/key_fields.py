"""The config fields the run keys of RECORD_VERSION 2 are computed over: every field the configs had when its
first record was written (2026-12-05), except three added before that as implementation choices
(model.attention_impl, model.attention_chunk, train.loss_chunk).

A field added since is left out of a run's key while it holds its default, which is the maths every earlier
record ran ("None for off"), so adding an option keeps the committed records; at any other value it is in the
key. This set is history, not a list to maintain: a new field is never added here. A new RECORD_VERSION, which
orphans every record anyway, starts its own set from the fields of its day.
"""

KEY_FIELDS = {
    "model": (
        'vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'd_ff', 'd_ff_multiple_of',
        'max_seq_len', 'norm', 'norm_position', 'norm_scale', 'norm_bias', 'norm_eps', 'qkv_bias', 'attn_out_bias',
        'mlp_bias', 'activation', 'block', 'parallel_norm', 'position', 'rope_theta', 'rope_fraction', 'rope_scaling',
        'rope_layout', 'relative_buckets', 'relative_max_distance', 'query_scale', 'qk_norm', 'attn_logit_softcap',
        'sliding_window', 'layer_pattern', 'document_mask', 'tie_embeddings', 'scale_embeddings',
        'final_logit_softcap', 'init_std', 'embed_dropout', 'resid_dropout', 'attn_dropout', 'param_dtype', 'dtype',
        'scan_layers', 'remat'
    ),
    "data": (
        'source', 'tokenizer', 'seq_len', 'data_dir', 'tfds_data_dir', 'tfds_val_split', 'seed', 'val_sequences',
        'val_fraction', 'shuffle_buffer', 'num_workers', 'cache_tokens'
    ),
    "train": (
        'steps', 'batch_size', 'lr', 'final_lr', 'warmup_steps', 'schedule', 'decay_fraction', 'beta1', 'beta2',
        'eps', 'weight_decay', 'decay_embeddings', 'grad_clip', 'weight_decay_mode', 'z_loss', 'loss',
        'log_per_layer', 'on_nonfinite', 'seed', 'log_every', 'eval_every', 'eval_batches', 'checkpoint_every',
        'keep_checkpoints', 'peak_tflops', 'sample_tokens', 'progress', 'allow_config_change'
    ),
    "mesh": (
        'data', 'fsdp', 'tensor'
    ),
    "dist": (
        'coordinator_address', 'num_processes', 'process_id'
    ),
}
