/** The file names each format saves a delta under. */
export const PEFT_CONFIG = 'adapter_config.json';
export const PEFT_WEIGHTS = 'adapter_model.safetensors';
export const OPENDELTA_CONFIG = 'config.json';
