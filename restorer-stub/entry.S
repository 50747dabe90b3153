/*
 * Entry and exits of the restorer stub (x86_64).
 *
 * stub_entry(plan): called by the launcher through ctypes as an ordinary C
 * function; rdi = the plan's address. It never returns: it leaves the
 * launcher's stack (which the stub is about to unmap) for the stub's own
 * stack in its .bss, and calls stub_main(plan).
 */
	.section .text.entry, "ax"
	.globl stub_entry
	.hidden stub_entry
	.type stub_entry, @function
stub_entry:
	lea	stub_stack_top(%rip), %rsp
	and	$-16, %rsp
	xor	%ebp, %ebp
	call	stub_main		/* noreturn */
	ud2
	.size stub_entry, . - stub_entry

/*
 * handover_gadget(frame_addr, gadget_syscall_ret, stub_start, stub_len):
 * rsp = frame_addr (whose first word, the pretcode slot, holds the address
 * of the target's own "mov $15,%rax; syscall"), then jump to the target's
 * "syscall; ret" with rax = munmap(stub_start, stub_len). The munmap
 * removes this code; the target's ret pops the pretcode slot and runs
 * rt_sigreturn with rsp = frame_addr + 8, which finds the frame at rsp - 8.
 */
	.text
	.globl handover_gadget
	.hidden handover_gadget
	.type handover_gadget, @function
handover_gadget:
	mov	%rsi, %r11
	mov	%rdi, %rsp
	mov	%rdx, %rdi
	mov	%rcx, %rsi
	mov	$11, %eax		/* __NR_munmap */
	jmp	*%r11
	.size handover_gadget, . - handover_gadget

/*
 * handover_sigreturn(sp): rsp = sp (= frame_addr + 8), rt_sigreturn. The
 * stub stays mapped (the fallback when the gadgets are missing).
 */
	.globl handover_sigreturn
	.hidden handover_sigreturn
	.type handover_sigreturn, @function
handover_sigreturn:
	mov	%rdi, %rsp
	mov	$15, %eax		/* __NR_rt_sigreturn */
	syscall
	ud2
	.size handover_sigreturn, . - handover_sigreturn

/*
 * stub_clone3(args, size, fn, arg): clone3(args, size); the parent gets
 * the result (new tid or -errno); the child, on the stack args gave it,
 * calls fn(arg), which never returns. r8/r9 survive the syscall in both
 * (the child starts with the parent's registers but rax = 0, rsp = the
 * new stack's top).
 */
	.globl stub_clone3
	.hidden stub_clone3
	.type stub_clone3, @function
stub_clone3:
	mov	%rdx, %r9
	mov	%rcx, %r8
	mov	$435, %eax		/* __NR_clone3 */
	syscall
	test	%rax, %rax
	jnz	1f
	xor	%ebp, %ebp
	and	$-16, %rsp
	mov	%r8, %rdi
	call	*%r9			/* noreturn */
	ud2
1:	ret
	.size stub_clone3, . - stub_clone3

/*
 * handover_thread_gadget(frame_addr, gadget_syscall_ret, counter, op):
 * how a thread other than the first leaves the stub when the stub is to
 * be unmapped. rsp = frame_addr, then the target's "syscall; ret" runs
 * futex(counter, FUTEX_WAKE_OP | PRIVATE, 1, 1, counter, op): the kernel
 * adds 1 to *counter and wakes the first thread waiting on it. The
 * thread is executing the target's code when that happens, so once the
 * counter says every thread has left, the stub may go. ret pops the
 * pretcode slot (the target's rt_sigreturn) as in handover_gadget.
 */
	.globl handover_thread_gadget
	.hidden handover_thread_gadget
	.type handover_thread_gadget, @function
handover_thread_gadget:
	mov	%rsi, %r11
	mov	%rdi, %rsp
	mov	%rdx, %rdi
	mov	%rdx, %r8
	mov	%ecx, %r9d
	mov	$133, %esi		/* FUTEX_WAKE_OP | FUTEX_PRIVATE_FLAG */
	mov	$1, %edx
	mov	$1, %r10d
	mov	$202, %eax		/* __NR_futex */
	jmp	*%r11
	.size handover_thread_gadget, . - handover_thread_gadget

/*
 * The sa_restorer of the stub's own fault handlers. The kernel requires
 * SA_RESTORER on x86_64; the handlers never return, so it never runs.
 */
	.globl stub_sigreturn
	.hidden stub_sigreturn
	.type stub_sigreturn, @function
stub_sigreturn:
	mov	$15, %eax
	syscall
	ud2
	.size stub_sigreturn, . - stub_sigreturn

/* The stub's stack: part of the image's memsz (MEM_SIZE), never in the blob. */
	.section .bss.stack, "aw", @nobits
	.balign 64
stub_stack:
	.skip 65536
stub_stack_top:

	.section .note.GNU-stack, "", @progbits
