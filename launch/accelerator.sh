# Sourced by the launch scripts: on a machine without CUDA tell DeepSpeed to use the CPU
# (DS_ACCELERATOR=cpu) instead of letting every process guess and print "Setting accelerator to CPU".
# MMGPT_DEBUG=1 leaves DeepSpeed to guess (and say so).
if [ -z "${DS_ACCELERATOR:-}" ] && [ -z "${MMGPT_DEBUG:-}" ] \
   && ! python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  export DS_ACCELERATOR=cpu
fi
