# The loop ckpt.checkpoint.splice runs in the snapshot's child
# (VMSPLICE_LOOP holds its bytes; tests/test_dump_splice.py assembles this
# file with `as` and compares).
#
# In: rbx = struct iovec[r12], r13 = the pipe's write end. vmsplice up to
# 1024 iovecs at a time and step over what was taken (a pipeful may end
# inside an iovec) until every byte is in the pipe: then int3 with rax 0.
# A failed vmsplice: close the pipe (the dumper, waiting for data, sees its
# end), then int3 with rax = -errno. No stack, no memory but the iovecs.
	.intel_syntax noprefix
	.text
	.globl _start
_start:
top:
	test r12, r12
	jz done
	mov eax, 278
	mov edi, r13d
	mov rsi, rbx
	mov rdx, r12
	cmp rdx, 1024
	jbe 1f
	mov edx, 1024
1:
	xor r10d, r10d
	syscall
	test rax, rax
	jle fail
next:
	mov rcx, [rbx + 8]
	cmp rax, rcx
	jb part
	sub rax, rcx
	add rbx, 16
	dec r12
	jz done
	test rax, rax
	jnz next
	jmp top
part:
	add [rbx], rax
	sub [rbx + 8], rax
	jmp top
done:
	xor eax, eax
	int3
	jmp done
fail:
	mov r14, rax
	mov eax, 3
	mov edi, r13d
	syscall
	mov rax, r14
2:
	int3
	jmp 2b
